// Refreshes document status and progress cells in the admin without reloading the page.
(function () {
  "use strict";
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
    if (status) {
      status.textContent = doc.status_label;
      status.className = `kb-status kb-status-${doc.status}`;
      status.title = doc.error || "";
    }
    if (!progress) return;
    progress.dataset.active = doc.active ? "1" : "0";
    if (doc.status === "failed") progress.textContent = doc.error;
    else if (doc.active) progress.textContent = `${doc.stage}: ${doc.chunks_embedded}/${doc.chunks_total} chunks, ${doc.elapsed}`;
    else progress.textContent = doc.chunks_total ? `${doc.chunks_total} chunks embedded in ${doc.elapsed}` : "";
  }

  async function poll() {
    const ids = activeIds();
    if (ids.length) {
      try {
        const response = await fetch(`${url}?ids=${ids.join(",")}`, { credentials: "same-origin" });
        if (response.ok) (await response.json()).documents.forEach(render);
      } catch (error) {
        // A missed poll is harmless; the next one catches up.
      }
    }
    window.setTimeout(poll, 2000);
  }
  window.setTimeout(poll, 1500);
})();
