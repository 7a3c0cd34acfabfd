/* The chat page: streams answers over SSE, links [n] citations to a source panel, keeps history.
 * Answers are Markdown (paragraphs, lists, code). They are rendered by a small renderer below
 * that builds elements with the DOM API and fills them with text nodes only: no HTML string
 * from an answer (or a document quoted in it) is ever parsed, so none can run script. */
(function () {
  "use strict";

  const root = document.getElementById("chat");
  if (!root) return;

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
  };
  const urls = {
    chat: root.dataset.chatUrl || "/api/v1/chat",
    conversations: root.dataset.conversationsUrl || "/api/v1/conversations",
    messages: root.dataset.messagesUrl || "/api/v1/chat/messages",
  };
  const emptyState = els.list.querySelector(".empty-state");
  const state = { conversationId: null, controller: null, panelOpener: null };

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
  // reasons are in its fields, so those are shown. Else the status line.
  async function errorText(response) {
    try {
      const body = await response.json();
      const fields = body && body.error && body.error.fields;
      if (fields && typeof fields === "object" && Object.keys(fields).length) {
        return Object.entries(fields).map(([name, reasons]) => {
          const text = [].concat(reasons).join(" ");
          return name === "message" || name === "non_field_errors" ? text : `${name}: ${text}`;
        }).join(" ");
      }
      if (body && body.error && body.error.message) return body.error.message;
      if (body && body.detail) return String(body.detail);
    } catch (e) { /* not JSON */ }
    if (response.status === 429) return "Too many requests. Please wait a moment and try again.";
    return `The server answered ${response.status} ${response.statusText}.`.replace(" .", ".");
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
    els.list.replaceChildren(emptyState);
    emptyState.hidden = false;
  }

  function addUserMessage(text) {
    emptyState.hidden = true;
    const node = el("div", { class: "message message-user", "data-testid": "user-message" });
    node.append(el("div", { class: "message-body" }, text));
    els.list.append(node);
    return node;
  }

  // One assistant bubble: its raw text, citations and status live on this object.
  function addAssistantMessage() {
    emptyState.hidden = true;
    const node = el("article", { class: "message message-assistant", "data-testid": "assistant-message", "aria-label": "Answer" });
    const bubble = {
      node, text: "", citations: new Map(), related: [], answerable: true, messageId: null,
      header: el("div", { class: "message-header" }),
      body: el("div", { class: "message-body" }),
      footer: el("div", { class: "message-footer" }),
    };
    node.append(bubble.header, bubble.body, bubble.footer);
    els.list.append(node);
    setStatus(bubble, "streaming");
    return bubble;
  }

  function setStatus(bubble, status) {
    bubble.node.dataset.status = status;
    bubble.node.setAttribute("aria-busy", status === "streaming" ? "true" : "false");
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
      const fence = line.match(/^\s*(`{3,}|~{3,})/);
      if (fence) {
        flushParagraph(); flushList();
        const marker = fence[1];
        const closing = new RegExp(`^\\s*\\${marker[0]}{${marker.length},}\\s*$`);
        const code = [];
        for (i += 1; i < lines.length && !closing.test(lines[i]); i++) code.push(lines[i]);
        const pre = el("pre", { class: "md-code" });
        pre.append(el("code", {}, code.join("\n")));
        frag.append(pre);
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
    setStatus(bubble, STATUS_FROM_SERVER[message.status] || "complete");
    bubble.footer.replaceChildren();
    if (message.status === "interrupted") showNotice(bubble, "stopped", "Stopped");
    if (message.status === "streaming") {
      showNotice(bubble, "info", "This answer is still being written.", [["Load final answer", () => loadFinal(bubble)]]);
    }
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
        if (data.conversation_id) state.conversationId = data.conversation_id;
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
        body: JSON.stringify({ message, conversation_id: state.conversationId, collection: els.collection.value || null, stream: true }),
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

  async function loadConversations() {
    try {
      const data = await getJSON(urls.conversations);
      const items = Array.isArray(data) ? data : data.results || [];
      els.conversations.replaceChildren(...items.map(conversationItem));
      els.sidebarStatus.textContent = items.length ? "" : "No conversations yet.";
    } catch (err) {
      els.sidebarStatus.textContent = `Could not load history: ${err.message}`;
    }
  }

  function conversationItem(c) {
    const button = el("button", { type: "button", class: "conversation", "data-id": c.id });
    if (c.id === state.conversationId) button.setAttribute("aria-current", "true");
    button.append(el("span", { class: "conversation-title" }, c.title || "Untitled conversation"));
    if (c.updated_at) {
      const when = new Date(c.updated_at);
      if (!isNaN(when)) button.append(el("time", { class: "conversation-time", datetime: c.updated_at }, when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" })));
    }
    button.addEventListener("click", () => openConversation(c.id));
    const li = el("li");
    li.append(button);
    return li;
  }

  async function openConversation(id) {
    stop();
    closeSidebar();
    closePanel(false);
    try {
      const conv = await getJSON(`${urls.conversations}/${encodeURIComponent(id)}`);
      state.conversationId = conv.id;
      clearMessages();
      for (const m of conv.messages || []) {
        if (m.role === "user") addUserMessage(m.content || "");
        else if (m.role === "assistant") renderStoredAssistant(addAssistantMessage(), m);
      }
      if (conv.collection && [...els.collection.options].some((o) => o.value === conv.collection)) els.collection.value = conv.collection;
      markCurrent();
      scrollToBottom();
      els.input.focus();
    } catch (err) {
      els.sidebarStatus.textContent = `Could not open the conversation: ${err.message}`;
    }
  }

  function markCurrent() {
    for (const b of els.conversations.querySelectorAll(".conversation")) {
      if (b.dataset.id === state.conversationId) b.setAttribute("aria-current", "true");
      else b.removeAttribute("aria-current");
    }
  }

  function newChat() {
    stop();
    state.conversationId = null;
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
  els.panelClose.addEventListener("click", () => closePanel());
  els.sidebarToggle.addEventListener("click", () => (root.classList.contains("sidebar-open") ? closeSidebar() : openSidebar()));
  els.sidebarClose.addEventListener("click", () => { closeSidebar(); els.sidebarToggle.focus(); });
  els.backdrop.addEventListener("click", () => { closePanel(); closeSidebar(); });
  window.addEventListener("resize", syncBackdrop);

  // Citation links are real links (middle-click opens the document); a plain click opens the panel.
  els.list.addEventListener("click", (e) => {
    const target = e.target.closest(".cite, .source-chip");
    if (!target || !target._citation) return;
    if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    openPanel(target._citation, target);
  });

  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || e.defaultPrevented) return;
    if (!els.panel.hidden) closePanel();
    else if (state.controller) stop();
    else if (root.classList.contains("sidebar-open")) { closeSidebar(); els.sidebarToggle.focus(); }
    else return;
    e.preventDefault();
  });

  // ?collection=<slug> (links from the home page) wins; then the one last chosen in this
  // browser; then the server's default (the collection of the user's last conversation).
  const STORED_COLLECTION = "kb.chat.collection";
  const stored = () => { try { return window.localStorage.getItem(STORED_COLLECTION); } catch (e) { return null; } };
  const offered = (slug) => slug && [...els.collection.options].some((o) => o.value === slug);
  const wanted = [new URLSearchParams(window.location.search).get("collection"), stored(), root.dataset.defaultCollection].find(offered);
  if (wanted) els.collection.value = wanted;
  els.collection.addEventListener("change", () => {
    try { window.localStorage.setItem(STORED_COLLECTION, els.collection.value); } catch (e) { /* private mode */ }
  });

  setStreaming(false);
  autosize();
  loadConversations();
})();
