/* The chat page: streams answers over SSE, links [n] citations to a source panel, keeps history
 * (rename, share, delete, paged in with "Show more"), asks one, several or all collections.
 * Answers are Markdown (paragraphs, lists, code). They are rendered by a small renderer below
 * that builds elements with the DOM API and fills them with text nodes only: no HTML string
 * from an answer (or a document quoted in it) is ever parsed, so none can run script.
 *
 * Each complete answer can be rated Helpful or Not helpful (PUT …/chat/messages/<id>/feedback);
 * Not helpful asks what was wrong in a small form under the answer.
 *
 * With #chat[data-readonly] (templates/chat/shared.html) it only renders the conversation
 * embedded in the page, with the same bubbles, citations, source panel and copy buttons, and
 * no rating. */
(function () {
  "use strict";

  const root = document.getElementById("chat");
  if (!root) return;
  const readonly = root.hasAttribute("data-readonly");

  const $ = (sel) => root.querySelector(sel);
  const els = {
    list: $('[data-testid="message-list"]'),
    form: $(".composer"),
    input: $('[data-testid="question-input"]'),
    counter: $('[data-testid="question-counter"]'),
    limit: $('[data-testid="question-too-long"]'),
    send: $('[data-testid="send-button"]'),
    stop: $('[data-testid="stop-button"]'),
    newChat: $('[data-testid="new-chat-button"]'),
    collection: $('[data-testid="collection-select"]'),
    conversations: $('[data-testid="conversation-list"]'),
    sidebarStatus: $(".sidebar-status"),
    sidebarToggle: $(".sidebar-toggle"),
    sidebarClose: $(".sidebar-close"),
    backdrop: $(".chat-backdrop"),
    panel: $('[data-testid="source-panel"]'),
    panelN: $(".source-n"),
    panelTitle: $('[data-testid="source-panel-title"]'),
    panelMeta: $(".source-meta"),
    panelText: $('[data-testid="source-panel-text"]'),
    panelOpen: $(".source-open"),
    panelClose: $(".source-close"),
    announcer: $(".chat-announcer"),
    scopeBoxes: $('[data-testid="collection-checkboxes"]'),
    scopeError: $('[data-testid="collection-checkboxes-error"]'),
    more: $('[data-testid="conversations-more"]'),
    menu: $('[data-testid="conversation-menu"]'),
    shareDialog: $('[data-testid="share-dialog"]'),
    shareSubject: $('[data-testid="share-dialog-subject"]'),
    shareLink: $('[data-testid="share-link"]'),
    shareLinkRow: $('[data-testid="share-link-row"]'),
    shareCreate: $('[data-testid="create-share-link"]'),
    shareCopy: $('[data-testid="copy-share-link"]'),
    shareStop: $('[data-testid="stop-sharing"]'),
    shareDone: $('[data-testid="share-dialog-done"]'),
    shareError: $('[data-testid="share-dialog-error"]'),
    deleteDialog: $('[data-testid="delete-dialog"]'),
    deleteSubject: $('[data-testid="delete-dialog-subject"]'),
    deleteCancel: $('[data-testid="cancel-delete"]'),
    deleteConfirm: $('[data-testid="confirm-delete"]'),
    deleteError: $('[data-testid="delete-dialog-error"]'),
  };
  const urls = {
    chat: root.dataset.chatUrl || "/api/v1/chat",
    conversations: root.dataset.conversationsUrl || "/api/v1/conversations",
    messages: root.dataset.messagesUrl || "/api/v1/chat/messages",
  };
  const emptyState = els.list.querySelector(".empty-state");
  const state = {
    conversationId: null, controller: null, panelOpener: null,
    // The sidebar: the next page of history, the item whose menu is open (and its button),
    // the item being renamed, the conversation a dialog acts on, and whether the list changed
    // while it could not be redrawn.
    historyNext: null, menuItem: null, menuOpener: null, editing: null, dialogFor: null,
    historyStale: false,
  };
  // Values of the scope options: a slug cannot contain ":", so neither can be a collection.
  const SCOPE_ALL = ":all";
  const SCOPE_SEVERAL = ":several";

  // --- Small helpers ------------------------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function csrfToken() {
    const m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (m) return decodeURIComponent(m[1]);
    const input = root.querySelector('input[name="csrfmiddlewaretoken"]');
    return input ? input.value : "";
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!response.ok) throw new Error(await errorText(response));
    return response.json();
  }

  // A non-2xx response is JSON {"error": {"code", "message", "fields"?}}; a validation error's
  // reasons are in its fields, so those are shown (`field`, the one the user typed, unnamed).
  async function errorText(response, field) {
    try {
      const body = await response.json();
      const fields = body && body.error && body.error.fields;
      if (fields && typeof fields === "object" && Object.keys(fields).length) {
        return Object.entries(fields).map(([name, reasons]) => {
          const text = [].concat(reasons).join(" ");
          return name === "message" || name === "non_field_errors" || name === field ? text : `${name}: ${text}`;
        }).join(" ");
      }
      if (body && body.error && body.error.message) return body.error.message;
      if (body && body.detail) return String(body.detail);
    } catch (e) { /* not JSON */ }
    if (response.status === 429) return "Too many requests. Please wait a moment and try again.";
    return `The server answered ${response.status} ${response.statusText}.`.replace(" .", ".");
  }

  // A JSON request with the session's CSRF token; the response, whatever its status.
  function sendJSON(method, url, body) {
    const init = {
      method, credentials: "same-origin",
      headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
    };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init);
  }

  // The API's absolute links (a page's `next`, a share link) name the host the server saw;
  // behind a proxy that may not be the one the browser used, so only their path is kept.
  function localPath(url) {
    const parsed = new URL(url, window.location.href);
    return parsed.pathname + parsed.search + parsed.hash;
  }

  // Small inline icons (no icon font, nothing fetched). Always decorative: the button that
  // holds one has a text label.
  const ICONS = {
    copy: "M5.5 5.5h7v8h-7z M3.5 10.5v-8h7",
    more: "M3 8h.01 M8 8h.01 M13 8h.01",
    // A hand, thumb up; the thumb down is the same hand turned (chat.css .icon-thumb-down).
    "thumb-up": "M1.5 7h3v7h-3z M4.5 7 7 2.2c1.1 0 1.9 1 1.6 2.1L8.2 6h4.4c.9 0 1.6.8 1.4 1.7l-1 5.1c-.1.7-.7 1.2-1.4 1.2H4.5",
  };

  function icon(name) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    for (const [k, v] of Object.entries({ viewBox: "0 0 16 16", width: "16", height: "16", class: `icon icon-${name}`, "aria-hidden": "true", focusable: "false" })) {
      svg.setAttribute(k, v);
    }
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", ICONS[name === "thumb-down" ? "thumb-up" : name]);
    svg.append(path);
    return svg;
  }

  // Polite announcements for screen readers ("Copied", "Deleted …"). Emptied first, so the
  // same words twice are read twice.
  function announce(text) {
    if (!els.announcer) return;
    els.announcer.textContent = "";
    window.setTimeout(() => { els.announcer.textContent = text; }, 50);
  }

  function nearBottom() {
    const l = els.list;
    return l.scrollHeight - l.scrollTop - l.clientHeight < 80;
  }

  function scrollToBottom() {
    els.list.scrollTop = els.list.scrollHeight;
  }

  // Below this width the source panel floats over the conversation instead of taking a column.
  const isOverlay = () => window.matchMedia("(max-width: 1023px)").matches;

  // --- Rendering messages --------------------------------------------------------------------

  function clearMessages() {
    els.list.replaceChildren(...(emptyState ? [emptyState] : []));
    if (emptyState) emptyState.hidden = false;
  }

  function addUserMessage(text) {
    if (emptyState) emptyState.hidden = true;
    const node = el("div", { class: "message message-user", "data-testid": "user-message" });
    node.append(el("div", { class: "message-body" }, text));
    els.list.append(node);
    return node;
  }

  // One assistant bubble: its raw text, citations and status live on this object.
  function addAssistantMessage() {
    if (emptyState) emptyState.hidden = true;
    const node = el("article", { class: "message message-assistant", "data-testid": "assistant-message", "aria-label": "Answer" });
    const bubble = {
      node, text: "", citations: new Map(), related: [], answerable: true, messageId: null,
      header: el("div", { class: "message-header" }),
      body: el("div", { class: "message-body" }),
      footer: el("div", { class: "message-footer" }),
      actions: el("div", { class: "message-actions" }),
    };
    // The answer as written (Markdown, with its [n] markers), not as the page shows it.
    bubble.actions.append(copyButton("Copy", "Copy answer", () => bubble.text, "copy-answer"));
    node.append(bubble.header, bubble.body, bubble.footer, bubble.actions);
    if (!readonly) {
      bubble.feedback = feedbackControls(bubble);
      bubble.actions.append(bubble.feedback.group);
      node.append(bubble.feedback.error, bubble.feedback.note);
    }
    els.list.append(node);
    setStatus(bubble, "streaming");
    return bubble;
  }

  function setStatus(bubble, status) {
    bubble.node.dataset.status = status;
    bubble.node.setAttribute("aria-busy", status === "streaming" ? "true" : "false");
    bubble.actions.hidden = status === "streaming" || !bubble.text.trim();
    if (bubble.feedback) {
      // Only a complete answer is rated: not one that failed, was stopped or is still written.
      const rateable = status === "complete" && Boolean(bubble.messageId);
      bubble.feedback.group.hidden = !rateable;
      if (!rateable) closeFeedbackForm(bubble, false);
    }
  }

  function setMode(bubble, mode, notice, answerable) {
    bubble.header.replaceChildren();
    bubble.answerable = answerable !== false;
    if (!bubble.answerable) {
      bubble.header.append(el("span", { class: "mode-label mode-not-covered", "data-testid": "mode-label" }, "Not covered by your documents"));
    } else if (mode === "extracted") {
      bubble.header.append(el("span", { class: "mode-label", "data-testid": "mode-label" }, "Extracted from sources (not generated)"));
    }
    if (notice) bubble.header.append(el("p", { class: "message-notice" }, notice));
  }

  function setCitations(bubble, citations) {
    bubble.citations = new Map((citations || []).map((c) => [Number(c.n), c]));
  }

  // Inline Markdown: `code`, **strong**, *em*, and [n] (or [1, 2]) citation links; unknown n
  // stay plain text. Links and HTML are not Markdown we render: they stay visible as text.
  function renderInline(text, bubble) {
    const frag = document.createDocumentFragment();
    const pattern = /(`+)([^`]+?)\1|\*\*(?=\S)([^*]+?)\*\*|\*(?=[^\s*])([^*]+?)\*|\[(\d+(?:\s*,\s*\d+)*)\]/g;
    let last = 0;
    for (const match of text.matchAll(pattern)) {
      let node;
      if (match[2] !== undefined) node = el("code", {}, match[2]);
      else if (match[3] !== undefined) node = el("strong", {}, match[3]);
      else if (match[4] !== undefined) node = el("em", {}, match[4]);
      else {
        const nums = match[5].split(",").map((s) => Number(s.trim()));
        if (!nums.some((n) => bubble.citations.has(n))) continue;
        node = document.createDocumentFragment();
        nums.forEach((n, i) => {
          if (i > 0) node.append(" ");
          node.append(bubble.citations.has(n) ? citationLink(bubble.citations.get(n)) : `[${n}]`);
        });
      }
      frag.append(text.slice(last, match.index), node);
      last = match.index + match[0].length;
    }
    frag.append(text.slice(last));
    return frag;
  }

  // Block Markdown: fenced code (kept whole, even while it streams in unclosed), bulleted and
  // numbered lists, headings and paragraphs.
  function renderMarkdown(text, bubble) {
    const frag = document.createDocumentFragment();
    const lines = text.split("\n");
    let paragraph = [];
    let list = null;
    const flushParagraph = () => {
      if (paragraph.length) {
        const p = el("p");
        p.append(renderInline(paragraph.join("\n"), bubble));
        frag.append(p);
      }
      paragraph = [];
    };
    const flushList = () => { list = null; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/);
      if (fence) {
        flushParagraph(); flushList();
        const marker = fence[1];
        const closing = new RegExp(`^\\s*\\${marker[0]}{${marker.length},}\\s*$`);
        const code = [];
        for (i += 1; i < lines.length && !closing.test(lines[i]); i++) code.push(lines[i]);
        frag.append(codeBlock(code.join("\n"), fence[2]));
        continue;
      }
      const item = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
      if (item) {
        flushParagraph();
        const ordered = /\d/.test(item[1]);
        if (!list || (list.tagName === "OL") !== ordered) {
          list = el(ordered ? "ol" : "ul", { class: "md-list" });
          frag.append(list);
        }
        const li = el("li");
        li.append(renderInline(item[2], bubble));
        list.append(li);
        continue;
      }
      if (!line.trim()) { flushParagraph(); flushList(); continue; }
      const heading = line.match(/^\s*#{1,6}\s+(.*)$/);
      if (heading) {
        flushParagraph(); flushList();
        const p = el("p", { class: "md-heading" });
        const strong = el("strong");
        strong.append(renderInline(heading[1], bubble));
        p.append(strong);
        frag.append(p);
        continue;
      }
      if (list && /^\s+\S/.test(line)) {
        list.lastChild.append(" ", renderInline(line.trim(), bubble));
        continue;
      }
      flushList();
      paragraph.push(line);
    }
    flushParagraph();
    return frag;
  }

  // A fenced code block: a bar with its language (the fence's info string, as text) and a copy
  // button, then the code.
  function codeBlock(code, language) {
    const block = el("div", { class: "md-code-block" });
    const head = el("div", { class: "md-code-head" });
    head.append(el("span", { class: "md-code-lang" }, language || "Code"),
      copyButton("Copy", "Copy code", () => code, "copy-code"));
    const pre = el("pre", { class: "md-code" });
    pre.append(el("code", {}, code));
    block.append(head, pre);
    return block;
  }

  function renderBody(bubble) {
    const active = document.activeElement;
    const refocus = active && bubble.body.contains(active) ? active.dataset.n : null;
    bubble.body.replaceChildren(renderMarkdown(bubble.text, bubble));
    if (refocus) {
      const again = bubble.body.querySelector(`[data-n="${refocus}"]`);
      if (again) again.focus();
    }
  }

  function citationLink(c) {
    const link = el("a", {
      class: "cite", href: c.url || "#", "data-testid": "citation-link", "data-n": String(c.n),
      "aria-controls": "source-panel", title: c.document_title || "",
      "aria-label": `Source ${c.n}: ${c.document_title || "passage"}`,
    }, `[${c.n}]`);
    link._citation = c;
    return link;
  }

  // Several passages of one document would give identical chips: each is told apart by its
  // section (the last heading) when that differs, else as "passage 2 of 3". The panel shows
  // the same note.
  function labelSources(citations) {
    const byDocument = new Map();
    for (const c of citations) {
      const key = c.document_id ?? c.document_title;
      byDocument.set(key, [...(byDocument.get(key) || []), c]);
    }
    const labels = new Map();
    for (const group of byDocument.values()) {
      const section = (c) => (c.heading_path || []).slice(-1)[0] || "";
      group.forEach((c, i) => {
        let label = `${c.document_title || "Untitled"}${c.page ? `, p. ${c.page}` : ""}`;
        c.passageNote = "";
        if (group.length > 1) {
          const unique = section(c) && group.filter((o) => section(o) === section(c) && o.page === c.page).length === 1;
          c.passageNote = `passage ${i + 1} of ${group.length} from this document`;
          label += unique ? ` › ${section(c)}` : ` · passage ${i + 1}`;
        }
        labels.set(c, label);
      });
    }
    return labels;
  }

  // Under a not-covered answer: the closest passages, as related sources, never as citations.
  function renderRelated(bubble) {
    bubble.node.querySelector(".message-related")?.remove();
    if (!bubble.related.length) return;
    const box = el("div", { class: "message-related", "data-testid": "related-sources" });
    box.append(el("p", { class: "related-title muted" }, "Related passages (they do not answer the question):"));
    const list = el("ul", { class: "message-sources", "aria-label": "Related passages" });
    const labels = labelSources(bubble.related);
    for (const c of bubble.related) {
      const button = el("button", { type: "button", class: "source-chip source-related", "aria-controls": "source-panel" },
        labels.get(c));
      button._citation = Object.assign({}, c, { related: true });
      const item = el("li");
      item.append(button);
      list.append(item);
    }
    box.append(list);
    bubble.body.after(box);
  }

  // Under a finished answer: the sources it actually cites, as buttons into the source panel.
  function renderSources(bubble, cited) {
    bubble.node.querySelector(":scope > .message-sources")?.remove();
    // Without the server's `cited` list (stored messages), list the markers the text actually uses.
    const marked = [...bubble.body.querySelectorAll(".cite")].map((a) => Number(a.dataset.n));
    const ns = [...new Set(cited && cited.length ? cited.map(Number) : marked)].filter((n) => bubble.citations.has(n));
    if (!ns.length) return;
    const list = el("ol", { class: "message-sources", "aria-label": "Sources" });
    const labels = labelSources(ns.map((n) => bubble.citations.get(n)));
    for (const n of ns) {
      const c = bubble.citations.get(n);
      const button = el("button", { type: "button", class: "source-chip", "aria-controls": "source-panel" });
      button.append(el("span", { class: "source-chip-n" }, `[${c.n}]`), ` ${labels.get(c)}`);
      button._citation = c;
      const item = el("li");
      item.append(button);
      list.append(item);
    }
    bubble.body.after(list);
  }

  // A state line under the bubble (Stopped, an error, Connection lost) with optional actions.
  function showNotice(bubble, kind, message, actions) {
    bubble.footer.replaceChildren();
    const attrs = { class: `message-state state-${kind}` };
    if (kind === "error") Object.assign(attrs, { "data-testid": "error-message", role: "alert" });
    const line = el("p", attrs, message);
    for (const [label, handler] of actions || []) {
      const button = el("button", { type: "button", class: "state-action" }, label);
      button.addEventListener("click", handler);
      line.append(" ", button);
    }
    bubble.footer.append(line);
  }

  // --- Copying --------------------------------------------------------------------------------

  // A copy button: `text()` gives what to copy when it is pressed. Its label says "Copied" for
  // a moment, and the page announces it.
  function copyButton(label, name, text, testid) {
    const button = el("button", { type: "button", class: "copy-button", "aria-label": name, "data-testid": testid });
    button.append(icon("copy"), el("span", { class: "copy-label" }, label));
    button._copy = text;
    return button;
  }

  async function copyPressed(button) {
    const ok = await copyText(button._copy(), button);
    const label = button.querySelector(".copy-label") || button;
    if (!button._label) button._label = label.textContent;
    label.textContent = ok ? "Copied" : "Copy failed";
    button.classList.toggle("is-copied", ok);
    announce(ok ? "Copied to the clipboard." : "Could not copy. Select the text and copy it by hand.");
    window.clearTimeout(button._reset);
    button._reset = window.setTimeout(() => {
      label.textContent = button._label;
      button.classList.remove("is-copied");
    }, 2000);
  }

  // navigator.clipboard exists only in a secure context (https, or localhost): on a LAN over
  // plain http it is undefined, and there the selection of a hidden textarea is copied instead.
  async function copyText(text, near) {
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        return true;
      } catch (e) { /* refused (permissions, an unfocused page): try the selection */ }
    }
    const focused = document.activeElement;
    const buffer = el("textarea", { class: "copy-buffer", readonly: "", tabindex: "-1", "aria-hidden": "true" });
    buffer.value = text;
    // Outside an open modal dialog everything is inert, and inert text cannot be selected.
    ((near && near.closest("dialog")) || document.body).append(buffer);
    buffer.select();
    buffer.setSelectionRange(0, text.length);
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    buffer.remove();
    if (focused && typeof focused.focus === "function") focused.focus({ preventScroll: true });
    return ok;
  }

  // A stored "streaming" answer is still being written by another request; it is not live here.
  const STATUS_FROM_SERVER = { complete: "complete", interrupted: "stopped", streaming: "stopped", error: "error" };

  function renderStoredAssistant(bubble, message) {
    bubble.messageId = message.id || bubble.messageId;
    bubble.text = message.content || "";
    setCitations(bubble, message.citations);
    bubble.related = message.related || [];
    if (message.mode) setMode(bubble, message.mode, message.notice, message.answerable);
    renderBody(bubble);
    renderSources(bubble, message.cited);
    renderRelated(bubble);
    if (bubble.feedback) {
      bubble.feedback.vote = message.feedback || null;
      showVote(bubble, bubble.feedback.vote?.rating);
    }
    setStatus(bubble, STATUS_FROM_SERVER[message.status] || "complete");
    bubble.footer.replaceChildren();
    if (message.status === "interrupted") showNotice(bubble, "stopped", "Stopped");
    if (message.status === "streaming" && !readonly) {
      showNotice(bubble, "info", "This answer is still being written.", [["Load final answer", () => loadFinal(bubble)]]);
    }
  }

  // --- Feedback: Helpful / Not helpful on each complete answer ---------------------------------

  // The reasons an answer is not helpful, as chat.models.AnswerFeedback.Reason has them.
  const FEEDBACK_REASONS = [
    ["wrong", "Wrong"], ["incomplete", "Incomplete"], ["outdated", "Outdated"],
    ["not_found", "Not found in the documents"],
  ];
  const FEEDBACK_THANKS = "Thanks — your feedback goes to the editors.";
  let feedbackForms = 0;

  const feedbackUrl = (bubble) => `${urls.messages}/${encodeURIComponent(bubble.messageId)}/feedback`;

  // Two toggle buttons (their text is their name; the icon is decorative), a line that thanks
  // (a status) and one that says what failed (an alert). `vote` is what the server holds; the
  // buttons show a newer vote while it is being saved.
  function feedbackControls(bubble) {
    const button = (rating, label) => {
      const b = el("button", { type: "button", class: "feedback-button", "aria-pressed": "false", "data-testid": `feedback-${rating}` });
      b.append(icon(`thumb-${rating}`), el("span", { class: "feedback-label" }, label));
      b.addEventListener("click", () => votePressed(bubble, rating));
      return b;
    };
    const feedback = {
      vote: null, form: null, saves: 0, queue: Promise.resolve(),
      group: el("div", { class: "feedback", role: "group", "aria-label": "Rate this answer", "data-testid": "feedback" }),
      up: button("up", "Helpful"),
      down: button("down", "Not helpful"),
      note: el("p", { class: "feedback-note", role: "status", "data-testid": "feedback-note" }),
      error: el("p", { class: "feedback-error", role: "alert", "data-testid": "feedback-error" }),
    };
    feedback.group.append(feedback.up, feedback.down);
    feedback.group.addEventListener("keydown", (e) => feedbackEscape(e, bubble));
    return feedback;
  }

  function showVote(bubble, rating) {
    const fb = bubble.feedback;
    fb.up.setAttribute("aria-pressed", String(rating === "up"));
    fb.down.setAttribute("aria-pressed", String(rating === "down"));
  }

  const shownRating = (fb) => ["up", "down"].find((r) => fb[r].getAttribute("aria-pressed") === "true") || null;

  function feedbackMessage(bubble, note, error) {
    bubble.feedback.note.textContent = note;
    bubble.feedback.error.textContent = error;
  }

  // Helpful sets "up" at once; Not helpful sets "down" at once and asks what was wrong; the
  // pressed button pressed again withdraws the vote.
  function votePressed(bubble, rating) {
    const fb = bubble.feedback;
    if (shownRating(fb) === rating) {
      closeFeedbackForm(bubble, false);
      saveVote(bubble, null, "Your vote was not withdrawn");
    } else if (rating === "up") {
      closeFeedbackForm(bubble, false);
      saveVote(bubble, { rating }, "Your vote was not saved");
    } else {
      saveVote(bubble, { rating }, "Your vote was not saved");
      openFeedbackForm(bubble);
    }
  }

  // Shows `vote` (null: none) at once and saves it once this answer's earlier saves are done,
  // so they reach the server in the order they were made. A failure says why and shows the vote
  // the server still has. Resolves to whether it was saved.
  function saveVote(bubble, vote, failed) {
    const fb = bubble.feedback;
    const save = ++fb.saves;
    showVote(bubble, vote && vote.rating);
    feedbackMessage(bubble, "", "");
    fb.queue = fb.queue.then(async () => {
      try {
        const response = await sendJSON(vote ? "PUT" : "DELETE", feedbackUrl(bubble), vote || undefined);
        if (!response.ok) throw new Error(await errorText(response, "comment"));
        fb.vote = vote ? await response.json() : null;
        if (save === fb.saves) showVote(bubble, fb.vote?.rating);
        return true;
      } catch (err) {
        // fetch() rejects with a TypeError when the server cannot be reached.
        const why = err instanceof TypeError ? "Could not reach the server. Check your connection." : err.message;
        feedbackMessage(bubble, "", `${failed}: ${why}`);
        showVote(bubble, fb.vote?.rating);
        if (fb.vote?.rating !== "down") closeFeedbackForm(bubble, false);
        return false;
      }
    });
    return fb.queue;
  }

  // Under an answer just marked not helpful: what was wrong (optional), a comment (optional),
  // Send and Cancel. Cancel or Escape keeps the plain "down" vote.
  function openFeedbackForm(bubble) {
    const fb = bubble.feedback;
    if (fb.form) return;
    const id = `feedback-${++feedbackForms}`;
    const form = el("form", { class: "feedback-form", "aria-label": "Why it was not helpful", "data-testid": "feedback-form", novalidate: "" });
    const reasons = el("fieldset", { class: "feedback-reasons" });
    reasons.append(el("legend", { class: "feedback-legend" }, "What was wrong with this answer?"));
    const choices = el("div", { class: "feedback-choices" });
    for (const [value, label] of FEEDBACK_REASONS) {
      const choice = el("label", { class: "feedback-choice" });
      choice.append(el("input", { type: "radio", name: `${id}-reason`, value, "data-testid": `feedback-reason-${value}` }),
        el("span", {}, label));
      choices.append(choice);
    }
    reasons.append(choices);
    const comment = el("textarea", {
      id: `${id}-comment`, class: "feedback-comment", rows: "2", maxlength: "4000",
      "data-testid": "feedback-comment",
    });
    const send = el("button", { type: "submit", class: "button-primary", "data-testid": "feedback-send" }, "Send");
    const cancel = el("button", { type: "button", "data-testid": "feedback-cancel" }, "Cancel");
    const buttons = el("div", { class: "feedback-form-actions" });
    buttons.append(send, cancel);
    form.append(reasons, el("label", { for: comment.id, class: "feedback-comment-label" }, "Comment (optional)"),
      comment, buttons);

    form.addEventListener("keydown", (e) => feedbackEscape(e, bubble));
    cancel.addEventListener("click", () => closeFeedbackForm(bubble, true));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      // Not disabled while sending: a disabled button would drop the keyboard focus.
      if (form._sending) return;
      form._sending = true;
      send.textContent = "Sending…";
      const reason = form.querySelector("input[type=radio]:checked")?.value || "";
      const ok = await saveVote(bubble, { rating: "down", reason, comment: comment.value }, "Your feedback was not sent");
      form._sending = false;
      send.textContent = "Send";
      // Not thanked when the vote changed meanwhile (the form closed with it).
      if (!ok || fb.form !== form) return;
      closeFeedbackForm(bubble, true);
      feedbackMessage(bubble, FEEDBACK_THANKS, "");
    });
    fb.form = form;
    fb.note.after(form);
    // The whole form in view (under the last answer it would start below the fold), then
    // focus on the first reason without a second jump.
    form.scrollIntoView({ block: "nearest" });
    choices.querySelector("input").focus({ preventScroll: true });
  }

  function closeFeedbackForm(bubble, restoreFocus) {
    const fb = bubble.feedback;
    if (!fb || !fb.form) return;
    // Focus inside the form would fall to the page's body when the form goes.
    const hadFocus = fb.form.contains(document.activeElement);
    fb.form.remove();
    fb.form = null;
    if (restoreFocus || hadFocus) fb.down.focus();
  }

  function feedbackEscape(e, bubble) {
    if (e.key !== "Escape" || !bubble.feedback.form) return;
    e.preventDefault();
    closeFeedbackForm(bubble, true);
  }

  // --- Sending and streaming ------------------------------------------------------------------

  // Incremental SSE parser: feed it decoded text; it calls onEvent(name, data) per complete event.
  function sseParser(onEvent) {
    let buffer = "", name = "", data = [];
    function line(text) {
      if (text === "") {
        if (data.length) onEvent(name || "message", data.join("\n"));
        name = ""; data = [];
      } else if (text[0] === ":") {
        // heartbeat / comment
      } else {
        const i = text.indexOf(":");
        const field = i === -1 ? text : text.slice(0, i);
        let value = i === -1 ? "" : text.slice(i + 1);
        if (value[0] === " ") value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
    }
    return {
      push(chunk) {
        buffer += chunk;
        // A trailing "\r" may be the first half of "\r\n" split across reads: hold it back.
        const hold = buffer.endsWith("\r") ? "\r" : "";
        const lines = (hold ? buffer.slice(0, -1) : buffer).split(/\r\n|\r|\n/);
        buffer = lines.pop() + hold;
        lines.forEach(line);
      },
      end() {
        if (buffer.replace(/\r$/, "")) line(buffer.replace(/\r$/, ""));
        buffer = "";
        line("");
      },
    };
  }

  function setStreaming(on) {
    els.send.disabled = on || tooLong();
    els.stop.disabled = !on;
    els.list.setAttribute("aria-busy", on ? "true" : "false");
    // The focused Stop button is about to be disabled: keep keyboard focus somewhere useful.
    if (!on && document.activeElement === els.stop) els.input.focus();
  }

  async function send(message) {
    if (state.controller || !message) return;
    const userNode = addUserMessage(message);
    const bubble = addAssistantMessage();
    scrollToBottom();
    const controller = new AbortController();
    state.controller = controller;
    setStreaming(true);
    let finished = false;
    let frame = 0;
    const handle = (name, raw) => {
      let data;
      try { data = JSON.parse(raw); } catch (e) { return; }
      const stick = nearBottom();
      if (name === "meta") {
        if (data.conversation_id) {
          state.conversationId = data.conversation_id;
          rememberConversation(data.conversation_id);
        }
        bubble.messageId = data.message_id || bubble.messageId;
        setMode(bubble, data.mode, data.notice, data.answerable);
      } else if (name === "citations") {
        setCitations(bubble, data.citations);
        bubble.related = data.related || [];
        renderBody(bubble);
      } else if (name === "delta") {
        bubble.text += data.text || "";
        // Re-render at most once per frame; long answers stream many small deltas.
        if (!frame) frame = requestAnimationFrame(() => { frame = 0; renderBody(bubble); if (stick) scrollToBottom(); });
      } else if (name === "done") {
        finished = true;
        if (data.message_id) bubble.messageId = data.message_id;
        renderBody(bubble);
        renderSources(bubble, data.cited);
        renderRelated(bubble);
        setStatus(bubble, "complete");
      } else if (name === "error") {
        finished = true;
        renderBody(bubble);
        setStatus(bubble, "error");
        showNotice(bubble, "error", data.message || "Something went wrong while answering.");
      }
      if (stick) scrollToBottom();
    };
    const retry = () => {
      if (state.controller) return;
      userNode.remove();
      bubble.node.remove();
      send(message);
    };
    try {
      const response = await fetch(urls.chat, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({ message, conversation_id: state.conversationId, ...scopeRequest(), stream: true }),
        signal: controller.signal,
      });
      if (!response.ok) {
        finished = true;
        const text = await errorText(response);
        showNotice(bubble, "error", text, response.status >= 500 ? [["Retry", retry]] : []);
        setStatus(bubble, "error");
        // A refused question goes back into the composer, so fixing it loses nothing.
        if (response.status < 500 && !els.input.value) {
          els.input.value = message;
          autosize();
        }
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const parser = sseParser(handle);
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
      parser.push(decoder.decode());
      parser.end();
      if (!finished) connectionLost(bubble, retry);
    } catch (err) {
      cancelAnimationFrame(frame);
      frame = 0;
      if (!finished) {
        renderBody(bubble);
        if (err.name === "AbortError") {
          setStatus(bubble, "stopped");
          showNotice(bubble, "stopped", "Stopped");
        } else {
          connectionLost(bubble, retry);
        }
      }
    } finally {
      if (state.controller === controller) state.controller = null;
      setStreaming(false);
      loadConversations();
    }
  }

  function connectionLost(bubble, retry) {
    if (bubble.text) renderBody(bubble);
    setStatus(bubble, "error");
    if (bubble.messageId) {
      showNotice(bubble, "error", "Connection lost.", [["Load final answer", () => loadFinal(bubble)]]);
    } else {
      showNotice(bubble, "error", "Could not reach the server. Check your connection.", [["Retry", retry]]);
    }
  }

  async function loadFinal(bubble) {
    showNotice(bubble, "info", "Loading the final answer…");
    try {
      const message = await getJSON(`${urls.messages}/${encodeURIComponent(bubble.messageId)}`);
      renderStoredAssistant(bubble, message);
    } catch (err) {
      setStatus(bubble, "error");
      showNotice(bubble, "error", `Could not load the answer: ${err.message}`, [["Try again", () => loadFinal(bubble)]]);
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  // --- History --------------------------------------------------------------------------------

  const conversationUrl = (id) => `${urls.conversations}/${encodeURIComponent(id)}`;
  const titleOf = (c) => c.title || "Untitled conversation";
  const itemFor = (id) => [...els.conversations.children].find((li) => li.dataset.id === id) || null;
  const actionsButtonFor = (id) => itemFor(id)?.querySelector(".conversation-more") || null;

  // The first page of history (most recent first). Called again after every answer; while a
  // title is being edited the list is left alone and redrawn when the edit ends.
  async function loadConversations() {
    if (state.editing) { state.historyStale = true; return; }
    try {
      const data = await getJSON(urls.conversations);
      if (state.editing) { state.historyStale = true; return; }
      const items = Array.isArray(data) ? data : data.results || [];
      // Redrawn under the keyboard (or an open menu, which closes): focus stays on the same
      // conversation.
      const menuId = state.menuItem?.dataset.id;
      const focusedId = menuId || document.activeElement?.closest?.(".conversation-item")?.dataset.id;
      const focusedMore = Boolean(menuId) || document.activeElement?.classList.contains("conversation-more");
      closeMenu(false);
      els.conversations.replaceChildren(...items.map(conversationItem));
      setHistoryNext(Array.isArray(data) ? null : data.next);
      els.sidebarStatus.textContent = items.length ? "" : "No conversations yet.";
      const again = focusedId && itemFor(focusedId);
      if (again) again.querySelector(focusedMore ? ".conversation-more" : ".conversation").focus();
    } catch (err) {
      els.sidebarStatus.textContent = `Could not load history: ${err.message}`;
    }
  }

  function setHistoryNext(next) {
    state.historyNext = next ? localPath(next) : null;
    els.more.hidden = !state.historyNext;
  }

  // "Show more": the next cursor page, appended; focus moves to the first conversation added.
  async function loadMoreConversations() {
    if (!state.historyNext || els.more.disabled) return;
    els.more.disabled = true;
    els.more.textContent = "Loading…";
    try {
      const data = await getJSON(state.historyNext);
      const known = new Set([...els.conversations.children].map((li) => li.dataset.id));
      const added = (data.results || []).filter((c) => !known.has(c.id)).map(conversationItem);
      els.conversations.append(...added);
      setHistoryNext(data.next);
      if (added.length) added[0].querySelector(".conversation").focus();
      else if (els.more.hidden) els.newChat.focus();
    } catch (err) {
      els.sidebarStatus.textContent = `Could not load more history: ${err.message}`;
    } finally {
      els.more.disabled = false;
      els.more.textContent = "Show more";
    }
  }

  // Short enough to leave room for the "Shared" marker: "Dec 8, 12:59 PM" this year,
  // "Dec 8, 2024" before.
  function formatWhen(when) {
    const thisYear = when.getFullYear() === new Date().getFullYear();
    return when.toLocaleString(undefined, thisYear
      ? { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" }
      : { year: "numeric", month: "short", day: "numeric" });
  }

  function conversationItem(c) {
    const li = el("li", { class: "conversation-item", "data-id": c.id, "data-testid": "conversation-item" });
    li._conversation = c;
    const button = el("button", { type: "button", class: "conversation", "data-id": c.id });
    if (c.id === state.conversationId) button.setAttribute("aria-current", "true");
    button.append(el("span", { class: "conversation-title", "data-testid": "conversation-title" }, titleOf(c)));
    const meta = el("span", { class: "conversation-meta" });
    if (c.updated_at) {
      const when = new Date(c.updated_at);
      if (!isNaN(when)) meta.append(el("time", { class: "conversation-time", datetime: c.updated_at }, formatWhen(when)));
    }
    if (c.shared) meta.append(el("span", { class: "shared-marker", "data-testid": "shared-marker" }, "Shared"));
    if (meta.childNodes.length) button.append(meta);
    button.addEventListener("click", () => openConversation(c.id));
    const more = el("button", {
      type: "button", class: "conversation-more", "aria-haspopup": "menu", "aria-expanded": "false",
      "aria-controls": "conversation-menu", "aria-label": `Actions for “${titleOf(c)}”`,
      title: "Rename, share or delete", "data-testid": "conversation-actions",
    });
    more.append(icon("more"));
    more.addEventListener("click", () => (menuOpenFor(more) ? closeMenu() : openMenu(li, more, 0)));
    more.addEventListener("keydown", (e) => {
      if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return;
      e.preventDefault();
      openMenu(li, more, e.key === "ArrowUp" ? -1 : 0);
    });
    li.append(button, more);
    return li;
  }

  // Redraws one item, with `changes` (a new title, shared or not) made to its conversation.
  function redrawItem(id, changes) {
    const li = itemFor(id);
    if (!li) return null;
    Object.assign(li._conversation, changes);
    const fresh = conversationItem(li._conversation);
    li.replaceWith(fresh);
    return fresh;
  }

  // --- The actions menu of a conversation (WAI-ARIA menu button) ---------------------------------

  const menuItems = () => [...els.menu.querySelectorAll('[role="menuitem"]')];
  const menuOpenFor = (opener) => !els.menu.hidden && state.menuOpener === opener;

  function openMenu(li, opener, index) {
    closeMenu(false);
    state.menuItem = li;
    state.menuOpener = opener;
    opener.setAttribute("aria-expanded", "true");
    els.menu.hidden = false;
    // Fixed, next to its button: inside the scrolling list it would be clipped at the bottom.
    const at = opener.getBoundingClientRect();
    const width = els.menu.offsetWidth;
    const height = els.menu.offsetHeight;
    let top = at.bottom + 4;
    if (top + height > window.innerHeight - 8) top = Math.max(8, at.top - height - 4);
    els.menu.style.top = `${top}px`;
    els.menu.style.left = `${Math.max(8, Math.min(at.right - width, window.innerWidth - width - 8))}px`;
    const items = menuItems();
    items[(index + items.length) % items.length].focus();
  }

  function closeMenu(restoreFocus = true) {
    if (els.menu.hidden) return;
    els.menu.hidden = true;
    const opener = state.menuOpener;
    state.menuOpener = null;
    state.menuItem = null;
    if (!opener) return;
    opener.setAttribute("aria-expanded", "false");
    if (restoreFocus && document.contains(opener)) opener.focus();
  }

  function menuKeydown(e) {
    const items = menuItems();
    const at = items.indexOf(document.activeElement);
    const move = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: items.length - 1 }[e.key];
    if (move !== undefined) {
      items[(move + items.length) % items.length].focus();
    } else if (e.key === "Escape" || e.key === "Tab") {
      closeMenu();
    } else {
      return;
    }
    e.preventDefault();
    e.stopPropagation();
  }

  function menuChosen(action) {
    const li = state.menuItem;
    closeMenu(false);
    if (!li || !document.contains(li)) return;
    if (action === "rename") startRename(li);
    else if (action === "share") openShare(li._conversation);
    else if (action === "delete") confirmDelete(li._conversation);
  }

  // --- Rename: the item becomes a small form in place -------------------------------------------

  function startRename(li) {
    if (state.editing) endRename(state.editing, false);
    const c = li._conversation;
    const id = `rename-${c.id}`;
    const form = el("form", { class: "rename-form", "data-testid": "rename-form", novalidate: "" });
    const input = el("input", {
      id, type: "text", class: "rename-input", maxlength: "200", autocomplete: "off",
      "data-testid": "rename-input", "aria-describedby": `${id}-error`,
    });
    input.value = c.title || "";
    const save = el("button", { type: "submit", class: "button-primary", "data-testid": "rename-save" }, "Save");
    const cancel = el("button", { type: "button", "data-testid": "rename-cancel" }, "Cancel");
    const error = el("p", { id: `${id}-error`, class: "rename-error", role: "alert", "data-testid": "rename-error" });
    error.hidden = true;
    const buttons = el("div", { class: "rename-actions" });
    buttons.append(save, cancel);
    form.append(el("label", { for: id, class: "visually-hidden" }, "New title"), input, buttons, error);
    for (const child of li.children) child.hidden = true;
    li.classList.add("is-editing");
    li.append(form);
    state.editing = li;
    input.focus();
    input.select();

    input.addEventListener("keydown", (e) => {
      if (e.key !== "Escape") return;
      e.preventDefault();
      e.stopPropagation();
      endRename(li);
    });
    cancel.addEventListener("click", () => endRename(li));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (save.disabled) return;
      const title = input.value.trim();
      if (title && title === c.title) { endRename(li); return; }
      save.disabled = true;
      try {
        const response = await sendJSON("PATCH", conversationUrl(c.id), { title });
        if (!response.ok) {
          error.textContent = await errorText(response, "title");
          error.hidden = false;
          input.setAttribute("aria-invalid", "true");
          input.focus();
          return;
        }
        const renamed = await response.json();
        Object.assign(c, renamed);
        endRename(li);
        announce(`Renamed to “${titleOf(c)}”.`);
      } catch (err) {
        error.textContent = `Could not rename: ${err.message}`;
        error.hidden = false;
        input.focus();
      } finally {
        save.disabled = false;
      }
    });
  }

  // Back to the plain item (with the title as it now is); focus returns to its actions button.
  function endRename(li, restoreFocus = true) {
    state.editing = null;
    const fresh = document.contains(li) ? redrawItem(li.dataset.id) : null;
    if (state.historyStale) {
      state.historyStale = false;
      loadConversations().then(() => {
        if (restoreFocus) actionsButtonFor(li.dataset.id)?.focus();
      });
    }
    if (restoreFocus && fresh) fresh.querySelector(".conversation-more").focus();
  }

  // --- Share and delete dialogs ---------------------------------------------------------------

  function showDialogError(node, text) {
    node.textContent = text;
    node.hidden = !text;
  }

  // The dialog of a conversation not shared yet asks first: opening it shares nothing. An
  // already shared one shows its link at once (sharing again gives the same link).
  function openShare(c) {
    state.dialogFor = c.id;
    els.shareSubject.textContent = titleOf(c);
    els.shareLink.value = "";
    els.shareCopy.disabled = true;
    els.shareStop.disabled = true;
    showDialogError(els.shareError, "");
    els.shareCreate.hidden = Boolean(c.shared);
    els.shareCreate.disabled = false;
    els.shareLinkRow.hidden = !c.shared;
    els.shareDialog.showModal();
    if (c.shared) {
      els.shareDone.focus();
      createShare();
    } else {
      els.shareCreate.focus();
    }
  }

  async function createShare() {
    const id = state.dialogFor;
    els.shareCreate.disabled = true;
    try {
      const response = await sendJSON("POST", `${conversationUrl(id)}/share`);
      if (!response.ok) throw new Error(await errorText(response));
      const data = await response.json();
      redrawItem(id, { shared: true });
      if (state.dialogFor !== id || !els.shareDialog.open) return;  // closed meanwhile
      els.shareCreate.hidden = true;
      els.shareLinkRow.hidden = false;
      els.shareLink.value = new URL(localPath(data.share_url), window.location.origin).href;
      els.shareCopy.disabled = false;
      els.shareStop.disabled = false;
      els.shareCopy.focus();
    } catch (err) {
      els.shareCreate.disabled = false;
      showDialogError(els.shareError, `Could not share it: ${err.message}`);
    }
  }

  async function stopSharing() {
    const id = state.dialogFor;
    els.shareStop.disabled = true;
    try {
      const response = await sendJSON("DELETE", `${conversationUrl(id)}/share`);
      if (!response.ok) throw new Error(await errorText(response));
      redrawItem(id, { shared: false });
      els.shareDialog.close();
      announce("Stopped sharing: the link no longer opens.");
    } catch (err) {
      els.shareStop.disabled = false;
      showDialogError(els.shareError, `Could not stop sharing: ${err.message}`);
    }
  }

  function confirmDelete(c) {
    state.dialogFor = c.id;
    els.deleteSubject.textContent = titleOf(c);
    els.deleteConfirm.disabled = false;
    showDialogError(els.deleteError, "");
    els.deleteDialog.showModal();
    // The safe choice has focus: Enter right away keeps the conversation.
    els.deleteCancel.focus();
  }

  async function deleteConfirmed() {
    const id = state.dialogFor;
    els.deleteConfirm.disabled = true;
    try {
      const response = await sendJSON("DELETE", conversationUrl(id));
      // 404: already deleted (in another tab); the outcome the user asked for.
      if (!response.ok && response.status !== 404) throw new Error(await errorText(response));
    } catch (err) {
      els.deleteConfirm.disabled = false;
      showDialogError(els.deleteError, `Could not delete it: ${err.message}`);
      return;
    }
    const li = itemFor(id);
    const title = li ? titleOf(li._conversation) : "the conversation";
    const neighbour = li && (li.nextElementSibling || li.previousElementSibling);
    state.dialogFor = null;
    els.deleteDialog.close();
    li?.remove();
    if (!els.conversations.children.length && els.more.hidden) els.sidebarStatus.textContent = "No conversations yet.";
    announce(`Deleted “${title}”.`);
    if (id === state.conversationId) newChat();
    else (neighbour ? neighbour.querySelector(".conversation") : els.newChat).focus();
  }

  // A dialog closed by Cancel, Done or Escape gives focus back to the actions button it came from.
  function dialogClosed() {
    if (state.dialogFor) actionsButtonFor(state.dialogFor)?.focus();
    state.dialogFor = null;
  }

  // A click on the backdrop (outside the dialog's box) closes it, as Escape does.
  function backdropClick(e) {
    const dialog = e.currentTarget;
    if (e.target !== dialog) return;
    const box = dialog.getBoundingClientRect();
    const inside = e.clientX >= box.left && e.clientX <= box.right && e.clientY >= box.top && e.clientY <= box.bottom;
    if (!inside) dialog.close();
  }

  // --- Scope: one collection, several, or all the user may read --------------------------------

  const offered = (value) => Boolean(value) && [...els.collection.options].some((o) => o.value === value);
  const scopeBoxes = () => (els.scopeBoxes ? [...els.scopeBoxes.querySelectorAll('input[type="checkbox"]')] : []);
  const checkedSlugs = () => scopeBoxes().filter((b) => b.checked).map((b) => b.value);

  function setCheckedSlugs(slugs) {
    for (const box of scopeBoxes()) box.checked = slugs.includes(box.value);
  }

  function syncScope() {
    if (!els.scopeBoxes) return;
    els.scopeBoxes.hidden = els.collection.value !== SCOPE_SEVERAL;
    if (els.scopeBoxes.hidden || checkedSlugs().length) showScopeError("");
  }

  function showScopeError(text) {
    if (!els.scopeError) return;
    els.scopeError.textContent = text;
    els.scopeError.hidden = !text;
  }

  // What POST /api/v1/chat is told: `collection`, `collections`, or neither (every collection
  // the user may read).
  function scopeRequest() {
    const value = els.collection.value;
    if (value === SCOPE_ALL) return {};
    if (value === SCOPE_SEVERAL) return { collections: checkedSlugs() };
    return { collection: value || null };
  }

  // A reopened conversation shows the scope it was asked in.
  function showScope(conv) {
    const slugs = conv.collection ? [conv.collection] : conv.collections || [];
    if (slugs.length === 1 && offered(slugs[0])) {
      els.collection.value = slugs[0];
    } else if (slugs.length > 1 && offered(SCOPE_SEVERAL)) {
      els.collection.value = SCOPE_SEVERAL;
      setCheckedSlugs(slugs);
    } else if (!slugs.length && offered(SCOPE_ALL)) {
      els.collection.value = SCOPE_ALL;
    }
    syncScope();
  }

  async function openConversation(id) {
    stop();
    closeSidebar();
    closePanel(false);
    try {
      const conv = await getJSON(conversationUrl(id));
      state.conversationId = conv.id;
      rememberConversation(conv.id);
      clearMessages();
      for (const m of conv.messages || []) {
        if (m.role === "user") addUserMessage(m.content || "");
        else if (m.role === "assistant") renderStoredAssistant(addAssistantMessage(), m);
      }
      showScope(conv);
      markCurrent();
      scrollToBottom();
      els.input.focus();
    } catch (err) {
      els.sidebarStatus.textContent = `Could not open the conversation: ${err.message}`;
      rememberConversation(state.conversationId);
    }
  }

  function markCurrent() {
    for (const b of els.conversations.querySelectorAll(".conversation")) {
      if (b.dataset.id === state.conversationId) b.setAttribute("aria-current", "true");
      else b.removeAttribute("aria-current");
    }
  }

  // The open conversation is in the address (?c=<id>), so a reload or a bookmark reopens it.
  function rememberConversation(id) {
    const url = id ? `${window.location.pathname}?c=${encodeURIComponent(id)}` : window.location.pathname;
    if (url !== `${window.location.pathname}${window.location.search}`) window.history.replaceState(null, "", url);
  }

  function newChat() {
    stop();
    state.conversationId = null;
    rememberConversation(null);
    clearMessages();
    closePanel(false);
    closeSidebar();
    markCurrent();
    els.input.value = "";
    autosize();
    els.input.focus();
  }

  // --- Source panel and sidebar ------------------------------------------------------------------

  function openPanel(citation, opener) {
    state.panelOpener = opener || null;
    els.panelN.textContent = citation.related ? "(related, not cited)" : `[${citation.n}]`;
    els.panelTitle.textContent = citation.document_title || "Untitled document";
    const meta = [];
    if (citation.page) meta.push(`Page ${citation.page}`);
    if (citation.heading_path && citation.heading_path.length) meta.push(citation.heading_path.join(" › "));
    if (citation.passageNote) meta.push(citation.passageNote);
    els.panelMeta.textContent = meta.join(" · ");
    els.panelMeta.hidden = !meta.length;
    els.panelText.textContent = citation.text || "";
    els.panelOpen.href = citation.url || "#";
    els.panelOpen.hidden = !citation.url;
    for (const a of els.list.querySelectorAll(".cite.is-active")) a.classList.remove("is-active");
    if (opener && opener.classList.contains("cite")) opener.classList.add("is-active");
    els.panel.hidden = false;
    root.classList.add("has-source");
    syncBackdrop();
    els.panel.scrollTop = 0;
    // Move focus where it is useful: into the overlay on small screens, keep reading flow on desktop.
    if (isOverlay()) els.panelClose.focus();
    else els.panel.focus({ preventScroll: true });
  }

  function closePanel(restoreFocus = true) {
    if (els.panel.hidden) return;
    els.panel.hidden = true;
    root.classList.remove("has-source");
    for (const a of els.list.querySelectorAll(".cite.is-active")) a.classList.remove("is-active");
    syncBackdrop();
    if (restoreFocus && state.panelOpener && document.contains(state.panelOpener)) state.panelOpener.focus();
    state.panelOpener = null;
  }

  function openSidebar() {
    root.classList.add("sidebar-open");
    els.sidebarToggle.setAttribute("aria-expanded", "true");
    syncBackdrop();
    els.newChat.focus();
  }

  function closeSidebar() {
    if (!root.classList.contains("sidebar-open")) return;
    root.classList.remove("sidebar-open");
    els.sidebarToggle.setAttribute("aria-expanded", "false");
    syncBackdrop();
  }

  function syncBackdrop() {
    const overlay = root.classList.contains("sidebar-open") || (!els.panel.hidden && isOverlay());
    els.backdrop.hidden = !overlay;
  }

  // --- Wiring ---------------------------------------------------------------------------------

  // Shared by both modes: citations open the source panel, copy buttons copy.
  // Citation links are real links (middle-click opens the document); a plain click opens the panel.
  els.list.addEventListener("click", (e) => {
    const copy = e.target.closest(".copy-button");
    if (copy && copy._copy) { copyPressed(copy); return; }
    const target = e.target.closest(".cite, .source-chip");
    if (!target || !target._citation) return;
    if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    openPanel(target._citation, target);
  });
  els.panelClose.addEventListener("click", () => closePanel());
  els.backdrop.addEventListener("click", () => { closePanel(); closeSidebar(); });
  window.addEventListener("resize", syncBackdrop);

  document.addEventListener("keydown", (e) => {
    // An open dialog handles its own Escape (it closes); the page must not act on it too.
    if (e.key !== "Escape" || e.defaultPrevented || root.querySelector("dialog[open]")) return;
    if (!els.panel.hidden) closePanel();
    else if (state.controller) stop();
    else if (root.classList.contains("sidebar-open")) { closeSidebar(); els.sidebarToggle.focus(); }
    else return;
    e.preventDefault();
  });

  if (readonly) {
    showSharedConversation();
    return;
  }

  // The shared page: the conversation embedded as JSON (the shape of GET
  // /api/v1/conversations/<id>) replaces the server's plain rendering of the same text.
  function showSharedConversation() {
    const source = document.getElementById("shared-conversation-data");
    let conv;
    try { conv = JSON.parse(source.textContent); } catch (e) { return; }
    if (!conv || !Array.isArray(conv.messages)) return;
    clearMessages();
    for (const m of conv.messages) {
      let node;
      if (m.role === "user") {
        node = addUserMessage(m.content || "");
      } else if (m.role === "assistant") {
        const bubble = addAssistantMessage();
        renderStoredAssistant(bubble, m);
        node = bubble.node;
      }
      if (node) node.dataset.testid = "shared-message";
    }
  }

  const maxChars = Number(els.counter && els.counter.dataset.max) || 0;
  const formatNumber = (n) => n.toLocaleString("en-US");
  // The server limits the trimmed question, so surrounding blank lines do not count.
  const tooLong = () => Boolean(maxChars) && els.input.value.trim().length > maxChars;

  function autosize() {
    els.input.style.height = "auto";
    els.input.style.height = `${Math.min(els.input.scrollHeight, 200)}px`;
    if (!els.counter || !maxChars) return;
    const length = els.input.value.length;
    const over = tooLong();
    els.counter.textContent = `${formatNumber(length)} / ${formatNumber(maxChars)} characters`;
    els.counter.classList.toggle("near-limit", !over && length >= maxChars * 0.9);
    els.counter.classList.toggle("over-limit", over);
    // No maxlength on the textarea: it would cut a long paste silently. The whole text stays,
    // and sending waits until the user has shortened it.
    els.input.setAttribute("aria-invalid", over ? "true" : "false");
    els.limit.hidden = !over;
    els.limit.textContent = over
      ? `Questions are limited to ${formatNumber(maxChars)} characters: shorten this one by ${formatNumber(els.input.value.trim().length - maxChars)} to send it.`
      : "";
    els.send.disabled = Boolean(state.controller) || over;
  }

  function submit() {
    const message = els.input.value.trim();
    if (!message || state.controller || tooLong()) return;
    // "Several…" with nothing ticked: say so, and keep the question where it is.
    if (els.collection.value === SCOPE_SEVERAL && !checkedSlugs().length) {
      showScopeError("Tick at least one collection to ask, or choose another option above.");
      scopeBoxes()[0]?.focus();
      return;
    }
    els.input.value = "";
    autosize();
    send(message);
  }

  els.form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  els.input.addEventListener("input", autosize);
  els.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  els.stop.addEventListener("click", stop);
  els.newChat.addEventListener("click", newChat);
  els.sidebarToggle.addEventListener("click", () => (root.classList.contains("sidebar-open") ? closeSidebar() : openSidebar()));
  els.sidebarClose.addEventListener("click", () => { closeSidebar(); els.sidebarToggle.focus(); });

  els.more.addEventListener("click", loadMoreConversations);
  els.menu.addEventListener("keydown", menuKeydown);
  els.menu.addEventListener("click", (e) => {
    const item = e.target.closest("[data-action]");
    if (item) menuChosen(item.dataset.action);
  });
  // A click anywhere else, a scroll of the list or a resize closes the menu where it stands.
  document.addEventListener("pointerdown", (e) => {
    if (!els.menu.hidden && !els.menu.contains(e.target) && !state.menuOpener?.contains(e.target)) closeMenu(false);
  });
  els.conversations.parentElement.addEventListener("scroll", () => closeMenu(false));
  window.addEventListener("resize", () => closeMenu(false));

  els.shareCopy._copy = () => els.shareLink.value;
  els.shareCopy.addEventListener("click", () => copyPressed(els.shareCopy));
  els.shareStop.addEventListener("click", stopSharing);
  els.shareCreate.addEventListener("click", createShare);
  els.shareDone.addEventListener("click", () => els.shareDialog.close());
  els.deleteCancel.addEventListener("click", () => els.deleteDialog.close());
  els.deleteConfirm.addEventListener("click", deleteConfirmed);
  for (const dialog of [els.shareDialog, els.deleteDialog]) {
    dialog.addEventListener("close", dialogClosed);
    dialog.addEventListener("click", backdropClick);
  }

  // ?collection=<slug> (links from the home page) wins; then the choice last made in this
  // browser (a collection, "All my collections" or "Several…" with its ticks); then the
  // server's default (the collection of the user's last conversation).
  const STORED_COLLECTION = "kb.chat.collection";
  const STORED_COLLECTIONS = "kb.chat.collections";
  const stored = (key) => { try { return window.localStorage.getItem(key); } catch (e) { return null; } };
  const store = (key, value) => { try { window.localStorage.setItem(key, value); } catch (e) { /* private mode */ } };
  const wanted = [new URLSearchParams(window.location.search).get("collection"), stored(STORED_COLLECTION), root.dataset.defaultCollection].find(offered);
  if (wanted) els.collection.value = wanted;
  try { setCheckedSlugs(JSON.parse(stored(STORED_COLLECTIONS) || "[]")); } catch (e) { /* not JSON */ }
  syncScope();
  els.collection.addEventListener("change", () => {
    store(STORED_COLLECTION, els.collection.value);
    syncScope();
  });
  els.scopeBoxes?.addEventListener("change", () => {
    store(STORED_COLLECTIONS, JSON.stringify(checkedSlugs()));
    syncScope();
  });

  setStreaming(false);
  autosize();
  loadConversations();
  const linked = new URLSearchParams(window.location.search).get("c");
  if (linked && /^[0-9a-f-]{36}$/i.test(linked)) openConversation(linked);
  else if (linked) rememberConversation(null);
})();
