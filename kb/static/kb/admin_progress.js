// Refreshes document status and progress in the admin list and on a document's page without
// reloading. Django's admin puts Media scripts in <head>, before the body exists, so nothing
// is looked up until the document has been parsed.
(function () {
  "use strict";

  function start() {
    const root = document.getElementById("kb-progress-root");
    if (!root) return;
    const url = root.dataset.progressUrl;

    function activeIds() {
      return Array.from(document.querySelectorAll("[data-document-progress][data-active='1']"))
        .map((el) => el.dataset.documentProgress);
    }

    function render(doc) {
      const progress = document.querySelector(`[data-document-progress="${doc.id}"]`);
      const status = document.querySelector(`[data-document-status="${doc.id}"]`);
      const title = document.querySelector(`[data-document-title="${doc.id}"]`);
      if (title && doc.title) title.textContent = doc.title;
      if (status) {
        status.textContent = doc.status_label;
        status.className = `kb-status kb-status-${doc.status}`;
        status.title = doc.error || "";
      }
      if (!progress) return;
      const wasActive = progress.dataset.active === "1";
      progress.dataset.active = doc.active ? "1" : "0";
      // Worded by the server (plurals, a queued document without chunks yet), as on page load.
      progress.textContent = doc.text;
      if (wasActive && !doc.active && root.dataset.reloadHint) {
        // The document page lists chunks and the extracted text, which only a reload shows.
        const link = document.createElement("a");
        link.href = window.location.pathname;
        link.textContent = root.dataset.reloadHint;
        link.className = "kb-reload-hint";
        progress.append(" ", link);
      }
    }

    async function poll() {
      const ids = activeIds();
      if (!ids.length) return; // nothing is moving; a reload starts polling again
      try {
        const response = await fetch(`${url}?ids=${ids.join(",")}`, { credentials: "same-origin" });
        if (response.ok) (await response.json()).documents.forEach(render);
      } catch (error) {
        // A missed poll is harmless; the next one catches up.
      }
      window.setTimeout(poll, 2000);
    }
    window.setTimeout(poll, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
