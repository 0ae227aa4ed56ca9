// berth WebUI: one chat session over the /ws WebSocket. Plain JS, no build step, no network but this origin.
// Invariant: model and user text only ever reach the DOM through textContent / text nodes (never innerHTML).
"use strict";

(() => {
  const TOKEN_KEY = "berth.token";
  const EOS = "<EOS>";
  const STOP_GRACE_MS = 10000;
  const DEFAULTS = { temperature: 0.7, top_p: 0.8, top_k: 30, max_new_tokens: 512 };
  const SOURCES_PREFIX = "\n\nSources: ";   // the frame a knowledge-base answer ends with (before <EOS>)
  const UPLOAD_POLL_MS = 300;
  const UPLOAD_POLL_LIMIT_MS = 30 * 60 * 1000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    transcript: $("transcript"), composer: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), newChat: $("new-chat"), modelName: $("model-name"),
    status: $("status"), settings: $("settings"), systemPrompt: $("system-prompt"),
    temperature: $("temperature"), topP: $("top-p"), topK: $("top-k"), maxNewTokens: $("max-new-tokens"),
    tokenDialog: $("token-dialog"), tokenForm: $("token-form"), tokenInput: $("token-input"),
    tokenError: $("token-error"),
    useKb: $("use-kb"), kbSwitchNote: $("kb-switch-note"), knowledge: $("knowledge"), kbMessage: $("kb-message"),
    kbFiles: $("kb-files"), kbUpload: $("kb-upload"), kbTotals: $("kb-totals"), kbDocs: $("kb-docs"),
  };

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    ready: false,           // /v1/models answered 200 with the current token
    ws: null,               // the open (or opening) session socket
    wsOpen: null,           // Promise resolved when ws is open
    turn: null,             // the answer being generated
    history: [],            // finished [prompt, answer] pairs: restores the dialogue on a new socket
    restoreHistory: false,  // next message must carry `history` (the socket was dropped mid-dialogue)
    kb: { available: null, listSeq: 0, uploading: false },  // knowledge base: null until first asked
  };

  // ---------- small helpers ----------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function base64url(text) {
    const bytes = new TextEncoder().encode(text);
    let binary = "";
    for (const b of bytes) binary += String.fromCharCode(b);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function numberOr(input, fallback) {
    const value = input.valueAsNumber;
    return Number.isFinite(value) ? value : fallback;
  }

  function showStatus(message, retry) {
    ui.status.replaceChildren();
    if (!message) return;
    const box = el("div", "status-error", message);
    box.setAttribute("role", "alert");
    if (retry) {
      const button = el("button", "btn retry", "Retry");
      button.type = "button";
      button.addEventListener("click", () => { showStatus(""); retry(); });
      box.append(" ", button);
    }
    ui.status.append(box);
  }

  function plural(count, noun) {
    return `${count} ${noun}${count === 1 ? "" : "s"}`;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function describeError(err) {
    const code = Number(err.code) || 0;
    const message = typeof err.message === "string" && err.message ? err.message : "unknown error";
    if (code === 401 || err.type === "authentication_error") return `Not authorised (401): ${message}`;
    if (code === 429 || code === 503 || err.type === "overloaded_error") {
      return `The server is busy (${code || "overloaded"}): ${message}. Try again shortly.`;
    }
    return code ? `Error ${code}: ${message}` : `Error: ${message}`;
  }

  // ---------- token and model probe ----------

  async function probe(token) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch("/v1/models", { headers, cache: "no-store" });
    if (response.status !== 200) return { status: response.status, model: null };
    const body = await response.json();
    return { status: 200, model: (body.data && body.data[0]) || null };
  }

  function setModel(model) {
    const id = model && typeof model.id === "string" ? model.id : "unknown model";
    ui.modelName.textContent = id;
    if (model && Number.isInteger(model.max_model_len)) {
      ui.modelName.title = `context ${model.max_model_len} tokens`;
      ui.maxNewTokens.max = String(model.max_model_len);
    }
  }

  async function start() {
    let result;
    try {
      result = await probe(state.token);
    } catch {
      showStatus("Cannot reach the server.", start);
      return;
    }
    if (result.status === 401) {
      askToken(state.token ? "Wrong token: the server refused it. Enter it again." : "");
      return;
    }
    if (result.status !== 200) {
      const busy = result.status === 429 || result.status === 503;
      showStatus(busy ? `The server is busy or still loading (${result.status}).`
                      : `The server answered ${result.status}.`, start);
      return;
    }
    state.ready = true;
    showStatus("");
    setModel(result.model);
  }

  function askToken(message) {
    state.ready = false;
    ui.tokenError.textContent = message;
    ui.tokenInput.value = "";
    if (!ui.tokenDialog.open) ui.tokenDialog.showModal();
    ui.tokenInput.focus();
  }

  async function onTokenSubmit(event) {
    event.preventDefault();
    const token = ui.tokenInput.value;
    if (!token) return;
    ui.tokenError.textContent = "Checking…";
    let result;
    try {
      result = await probe(token);
    } catch {
      ui.tokenError.textContent = "Cannot reach the server.";
      return;
    }
    if (result.status === 401) {
      ui.tokenInput.value = "";
      ui.tokenError.textContent = "Wrong token: the server refused it. Try again.";
      ui.tokenInput.focus();
      return;
    }
    if (result.status !== 200) {
      ui.tokenError.textContent = `The server answered ${result.status}. Try again shortly.`;
      return;
    }
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.tokenError.textContent = "";
    ui.tokenDialog.close();
    closeSocket();
    state.ready = true;
    showStatus("");
    setModel(result.model);
    if (ui.knowledge.open) loadDocuments();
    ui.prompt.focus();
  }

  // ---------- the WebSocket session ----------

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws`;
  }

  function connect() {
    if (state.wsOpen) return state.wsOpen;
    // The token travels as a subprotocol, never in the URL (browsers cannot set headers on a WebSocket).
    const protocols = state.token ? ["berth", "berth-token." + base64url(state.token)] : [];
    const ws = new WebSocket(socketUrl(), protocols);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    let opened = false;
    state.wsOpen = new Promise((resolve, reject) => {
      ws.onopen = () => { opened = true; resolve(ws); };
      ws.onclose = () => { onSocketClosed(ws, opened); reject(new Error("closed")); };
    });
    state.wsOpen.catch(() => {});
    ws.onmessage = (event) => {
      const data = typeof event.data === "string" ? event.data : new TextDecoder().decode(event.data);
      onFrame(data);
    };
    return state.wsOpen;
  }

  function onSocketClosed(ws, opened) {
    if (state.ws !== ws) return;
    state.ws = null;
    state.wsOpen = null;
    state.restoreHistory = state.history.length > 0;
    const turn = state.turn;
    if (!turn || !opened) return;  // a socket that never opened is reported by failToConnect
    if (turn.stopped) finishTurn("stopped");
    else failTurn("The connection to the server was lost.");
  }

  function closeSocket() {
    const ws = state.ws;
    state.ws = null;
    state.wsOpen = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(1000);
    }
  }

  function onFrame(data) {
    const turn = state.turn;
    if (!turn) return;
    if (data === EOS) {
      finishTurn(turn.error ? "error" : turn.stopped ? "stopped" : "done");
      return;
    }
    if (data.startsWith('{"error"')) {
      try {
        const parsed = JSON.parse(data);
        if (parsed && parsed.error && typeof parsed.error === "object") {
          turn.error = parsed.error;
          showTurnError(turn, describeError(parsed.error));
          if (Number(parsed.error.code) === 401) askToken("The server refused the token. Enter it again.");
          return;
        }
      } catch { /* plain model text that happens to look like JSON */ }
    }
    if (!data) return;
    if (turn.langchain && data.startsWith(SOURCES_PREFIX)) {
      // Shown apart from the answer once <EOS> confirms it was the last frame (never part of turn.text).
      if (turn.sources !== null) turn.text += turn.sources;
      turn.sources = data;
      return;
    }
    if (turn.sources !== null) {   // model text that merely looked like the sources line
      turn.text += turn.sources;
      turn.sources = null;
    }
    const now = performance.now();
    if (turn.firstAt === null) turn.firstAt = now;
    turn.lastAt = now;
    turn.numTokens += 1;
    turn.text += data;
    scheduleRender(turn);
  }

  // ---------- turns ----------

  function requestBody(prompt, langchain) {
    const body = {
      prompt,
      system_prompt: ui.systemPrompt.value,
      temperature: numberOr(ui.temperature, DEFAULTS.temperature),
      top_p: numberOr(ui.topP, DEFAULTS.top_p),
      top_k: Math.trunc(numberOr(ui.topK, DEFAULTS.top_k)),
      max_new_tokens: Math.trunc(numberOr(ui.maxNewTokens, DEFAULTS.max_new_tokens)),
      use_stream_chat: true,
    };
    if (langchain) body.langchain = true;
    if (state.restoreHistory) body.history = state.history.map((pair) => pair.slice());
    return body;
  }

  function addMessage(role, text) {
    const article = el("article", `msg ${role}`);
    article.dataset.role = role;
    article.append(el("div", "who", role === "user" ? "You" : "Assistant"));
    const body = el("div", "body");
    if (text !== undefined) body.textContent = text;
    article.append(body);
    ui.transcript.append(article);
    article.scrollIntoView({ block: "end" });
    return article;
  }

  function knowledgeSwitchOn() {
    return ui.useKb.checked && !ui.useKb.disabled;
  }

  async function sendPrompt(prompt, langchain = knowledgeSwitchOn()) {
    if (state.turn || !state.ready || !prompt.trim()) return;
    const userEl = addMessage("user", prompt);
    const article = addMessage("assistant");
    article.dataset.state = "streaming";
    if (langchain) article.dataset.knowledge = "true";
    const meta = el("div", "meta", "waiting…");
    article.append(meta);
    const turn = {
      prompt, userEl, article, body: article.querySelector(".body"), meta, text: "", numTokens: 0,
      sentAt: performance.now(), firstAt: null, lastAt: null, stopped: false, error: null,
      renderPending: false, stopTimer: null, langchain, sources: null,
    };
    state.turn = turn;
    setBusy(true);
    let ws;
    try {
      ws = await connect();
    } catch {
      if (state.turn === turn) await failToConnect(turn);
      return;
    }
    if (state.turn !== turn) return;
    ws.send(JSON.stringify(requestBody(prompt, langchain)));
    state.restoreHistory = false;
    turn.sentAt = performance.now();
  }

  async function failToConnect(turn) {
    let status = 0;
    try { status = (await probe(state.token)).status; } catch { /* unreachable server */ }
    if (status === 401) {
      failTurn("Not authorised (401): the server needs a valid token.");
      askToken(state.token ? "Wrong token: the server refused it. Enter it again." : "");
    } else if (status === 429 || status === 503) {
      failTurn(`The server is busy (${status}). Try again shortly.`);
    } else {
      failTurn("Could not open a session with the server.");
    }
  }

  function stopGeneration() {
    const turn = state.turn;
    if (!turn || turn.stopped) return;
    turn.stopped = true;
    ui.stop.disabled = true;
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify({ action: "cancel" }));
      // The server ends a cancelled round with <EOS>; if it never does, drop the socket (which aborts too).
      turn.stopTimer = setTimeout(() => {
        if (state.turn === turn) { closeSocket(); state.restoreHistory = state.history.length > 0; finishTurn("stopped"); }
      }, STOP_GRACE_MS);
    } else {
      closeSocket();
      finishTurn("stopped");
    }
  }

  function finishTurn(outcome) {
    const turn = state.turn;
    if (!turn) return;
    clearTimeout(turn.stopTimer);
    state.turn = null;
    renderTurn(turn);
    if (turn.sources !== null) renderSources(turn);
    turn.article.dataset.state = outcome;
    updateMeta(turn, outcome === "stopped" ? "stopped" : "");
    if (outcome !== "error" && turn.text) state.history.push([turn.prompt, turn.text]);
    setBusy(false);
  }

  function failTurn(message) {
    const turn = state.turn;
    if (!turn) return;
    showTurnError(turn, message);
    finishTurn("error");
  }

  function showTurnError(turn, message) {
    const old = turn.article.querySelector(".error");
    if (old) old.remove();
    const box = el("div", "error", message);
    box.setAttribute("role", "alert");
    const retry = el("button", "btn retry", "Retry");
    retry.type = "button";
    retry.addEventListener("click", () => retryTurn(turn));
    box.append(" ", retry);
    turn.article.append(box);
  }

  function retryTurn(turn) {
    if (state.turn) return;
    if (!state.ready) { start(); return; }
    turn.userEl.remove();
    turn.article.remove();
    sendPrompt(turn.prompt, turn.langchain);
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.transcript.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function updateMeta(turn, suffix) {
    const parts = [];
    if (turn.firstAt !== null) {
      parts.push(`TTFT ${Math.round(turn.firstAt - turn.sentAt)} ms`);
      const seconds = (turn.lastAt - turn.firstAt) / 1000;
      const rate = turn.numTokens > 1 && seconds > 0 ? ((turn.numTokens - 1) / seconds).toFixed(1) : "–";
      parts.push(`≈ ${rate} tokens/s`);
      parts.push(`≈ ${turn.numTokens} tokens`);
    } else {
      parts.push(turn.error ? "no answer" : "no tokens");
    }
    if (suffix) parts.push(suffix);
    turn.meta.textContent = parts.join(" · ");
  }

  // ---------- rendering (text nodes only) ----------

  /** The knowledge-base sources under the answer: their own element, never part of the answer text. */
  function renderSources(turn) {
    const text = turn.sources.slice(SOURCES_PREFIX.length).trim();
    const box = el("div", "sources");
    box.append(el("span", "sources-label", "Sources"));
    const list = el("ul", "sources-list");
    for (const item of text.split(/;\s+(?=\[\d+\]\s)/)) list.append(el("li", "source", item));
    box.append(list);
    turn.meta.before(box);
  }

  function scheduleRender(turn) {
    if (turn.renderPending) return;
    turn.renderPending = true;
    requestAnimationFrame(() => { if (turn.renderPending) renderTurn(turn); });
  }

  function renderTurn(turn) {
    turn.renderPending = false;
    renderText(turn.body, turn.text);
    if (state.turn === turn) updateMeta(turn, "");
    const nearBottom = ui.transcript.scrollHeight - ui.transcript.scrollTop - ui.transcript.clientHeight < 80;
    if (nearBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  /** Render text with ``` fenced code blocks as <pre><code>, everything else as pre-wrapped text. */
  function renderText(container, text) {
    const fragment = document.createDocumentFragment();
    let lines = [];
    let code = null;  // {lang, lines} while inside a fence
    const flushText = () => {
      const chunk = lines.join("\n").replace(/^\n+|\n+$/g, "");
      if (chunk) fragment.append(el("div", "text", chunk));
      lines = [];
    };
    const flushCode = () => {
      const pre = el("pre", "code-block");
      const codeEl = el("code", "", code.lines.join("\n"));
      if (code.lang) { codeEl.dataset.lang = code.lang; pre.dataset.lang = code.lang; }
      pre.append(codeEl);
      fragment.append(pre);
      code = null;
    };
    for (const line of text.split("\n")) {
      const fence = /^\s*```\s*([\w+#.-]*)/.exec(line);
      if (fence && code === null) { flushText(); code = { lang: fence[1], lines: [] }; }
      else if (fence && /^\s*```\s*$/.test(line)) flushCode();
      else if (code !== null) code.lines.push(line);
      else lines.push(line);
    }
    if (code !== null) flushCode();  // an unclosed fence while streaming
    flushText();
    container.replaceChildren(fragment);
  }

  // ---------- knowledge base: the documents panel ----------

  /** An authenticated call to this origin: {status, data} (status 0: the server could not be reached). */
  async function api(method, path, body) {
    const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
    let response;
    try {
      response = await fetch(path, { method, headers, body, cache: "no-store" });
    } catch {
      return { status: 0, data: null };
    }
    let data = null;
    try { data = await response.json(); } catch { /* not JSON */ }
    if (response.status === 401) askToken("The server refused the token. Enter it again.");
    return { status: response.status, data };
  }

  function apiError(result, what) {
    if (result.status === 0) return `${what}: cannot reach the server.`;
    const err = result.data && result.data.error;
    if (err && typeof err === "object") return `${what}: ${describeError({ ...err, code: err.code || result.status })}`;
    return `${what}: the server answered ${result.status}.`;
  }

  /** The 400 every knowledge route answers when the server was started without a knowledge base. */
  function noKnowledgeBase(result) {
    const err = result.data && result.data.error;
    return result.status === 400 && err && typeof err === "object" && err.param === "knowledge";
  }

  function showKbMessage(message, isError) {
    ui.kbMessage.textContent = message || "";
    ui.kbMessage.classList.toggle("is-error", Boolean(message && isError));
  }

  function setKbAvailable(available, message) {
    state.kb.available = available;
    if (available === false) {
      ui.useKb.checked = false;
      ui.useKb.disabled = true;
      ui.kbSwitchNote.textContent = "(this server has no knowledge base)";
      ui.kbFiles.disabled = true;
      ui.kbDocs.replaceChildren();
      ui.kbTotals.textContent = "";
      showKbMessage(message || "This server has no knowledge base.", true);
    } else {
      ui.useKb.disabled = false;
      ui.kbSwitchNote.textContent = "";
      ui.kbFiles.disabled = state.kb.uploading;
    }
  }

  async function loadDocuments() {
    const seq = ++state.kb.listSeq;
    ui.kbDocs.setAttribute("aria-busy", "true");
    const result = await api("GET", "/api/v1/documents");
    if (seq !== state.kb.listSeq) return;   // a newer listing is on its way
    ui.kbDocs.setAttribute("aria-busy", "false");
    const body = result.data;
    if (result.status === 200 && body && Array.isArray(body.documents)) {
      setKbAvailable(true);
      renderDocuments(body.documents, Number(body.num_chunks) || 0);
    } else if (result.status === 400) {   // the only 400 of this route: no knowledge base
      setKbAvailable(false, body && body.error && typeof body.error.message === "string" ? body.error.message : "");
    } else {
      showKbMessage(apiError(result, "Could not list the documents"), true);
    }
  }

  function renderDocuments(docs, numChunks) {
    const fragment = document.createDocumentFragment();
    for (const doc of docs) {
      const name = String(doc && doc.name);
      const item = el("li", "kb-doc");
      item.dataset.name = name;
      const nameEl = el("span", "kb-doc-name", name);
      nameEl.title = name;
      const chunks = el("span", "kb-doc-chunks", plural(Number(doc.num_chunks) || 0, "chunk"));
      const remove = el("button", "btn kb-delete", "Delete");
      remove.type = "button";
      remove.setAttribute("aria-label", `Delete ${name}`);
      remove.addEventListener("click", () => deleteDocument(name, remove));
      item.append(nameEl, chunks, remove);
      fragment.append(item);
    }
    ui.kbDocs.replaceChildren(fragment);
    ui.kbTotals.textContent = docs.length
      ? `${plural(docs.length, "document")} · ${plural(numChunks, "chunk")}`
      : "No documents yet: add some above.";
  }

  async function deleteDocument(name, button) {
    button.disabled = true;
    const result = await api("DELETE", "/api/v1/documents/" + encodeURIComponent(name));
    if (result.status === 200) showKbMessage(`Deleted ${name}.`, false);
    else if (noKnowledgeBase(result)) setKbAvailable(false, result.data.error.message);
    else showKbMessage(apiError(result, `Could not delete ${name}`), true);
    await loadDocuments();
  }

  async function uploadFiles() {
    const files = [...ui.kbFiles.files];
    if (!files.length || state.kb.uploading) return;
    state.kb.uploading = true;
    ui.kbFiles.disabled = true;
    showKbMessage("");
    const statusLine = el("li", "kb-upload-status", `indexing… (${plural(files.length, "file")})`);
    ui.kbUpload.dataset.status = "pending";
    ui.kbUpload.replaceChildren(statusLine);
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    try {
      const started = await api("POST", "/api/v1/upload_data", form);
      const taskId = started.data && started.data.task_id;
      if (started.status !== 200 || typeof taskId !== "string") {
        ui.kbUpload.dataset.status = "failed";
        statusLine.textContent = apiError(started, "Upload failed");
        if (noKnowledgeBase(started)) setKbAvailable(false, started.data.error.message);
        return;
      }
      const task = await pollUpload(taskId, statusLine);
      if (task) showUploadResult(task, statusLine);
    } finally {
      state.kb.uploading = false;
      ui.kbFiles.value = "";
      ui.kbFiles.disabled = state.kb.available === false;
      if (state.kb.available !== false) await loadDocuments();
    }
  }

  /** get_upload_state every UPLOAD_POLL_MS until the task is completed or failed; null when polling failed. */
  async function pollUpload(taskId, statusLine) {
    const deadline = performance.now() + UPLOAD_POLL_LIMIT_MS;
    let unreachable = 0;
    while (performance.now() < deadline) {
      await sleep(UPLOAD_POLL_MS);
      const result = await api("GET", "/api/v1/get_upload_state?task_id=" + encodeURIComponent(taskId));
      if (result.status === 0 && ++unreachable < 5) continue;
      const task = result.data;
      if (result.status !== 200 || !task || typeof task !== "object") {
        ui.kbUpload.dataset.status = "failed";
        statusLine.textContent = apiError(result, "Could not follow the upload");
        return null;
      }
      unreachable = 0;
      if (task.status === "completed" || task.status === "failed") return task;
      ui.kbUpload.dataset.status = "processing";
    }
    ui.kbUpload.dataset.status = "failed";
    statusLine.textContent = "Still indexing after a long time; the list below shows what is done.";
    return null;
  }

  function showUploadResult(task, statusLine) {
    const done = Array.isArray(task.documents) ? task.documents : [];
    const errors = Array.isArray(task.errors) ? task.errors : [];
    ui.kbUpload.dataset.status = task.status;
    statusLine.textContent = task.status === "completed"
      ? `indexed ${plural(done.length, "file")}${errors.length ? `, ${errors.length} failed` : ""}`
      : "indexing failed";
    for (const name of done) ui.kbUpload.append(el("li", "kb-file ok", `${String(name)}: indexed`));
    for (const err of errors) {
      const file = err && typeof err.file === "string" ? err.file : "?";
      const message = err && typeof err.error === "string" ? err.error : "could not be indexed";
      ui.kbUpload.append(el("li", "kb-file failed", message.startsWith(file + ":") ? message : `${file}: ${message}`));
    }
  }

  function onKnowledgeSwitch() {
    // Whether the server has a knowledge base is asked on first use (a page load sends no request that may fail).
    if (ui.useKb.checked && state.kb.available !== true) loadDocuments();
  }

  // ---------- wiring ----------

  function newChat() {
    if (state.turn) { clearTimeout(state.turn.stopTimer); state.turn = null; }
    closeSocket();
    state.history = [];
    state.restoreHistory = false;
    ui.transcript.replaceChildren();
    setBusy(false);
    showStatus("");
    ui.prompt.focus();
  }

  function submitPrompt() {
    if (state.turn) return;
    if (!state.ready) { start(); return; }
    const prompt = ui.prompt.value;
    if (!prompt.trim()) return;
    ui.prompt.value = "";
    sendPrompt(prompt);
  }

  ui.composer.addEventListener("submit", (event) => { event.preventDefault(); submitPrompt(); });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitPrompt();
    } else if (event.key === "Escape" && state.turn) {
      stopGeneration();
    }
  });
  ui.stop.addEventListener("click", stopGeneration);
  ui.newChat.addEventListener("click", newChat);
  ui.tokenForm.addEventListener("submit", onTokenSubmit);
  ui.knowledge.addEventListener("toggle", () => { if (ui.knowledge.open) loadDocuments(); });
  ui.kbFiles.addEventListener("change", uploadFiles);
  ui.useKb.addEventListener("change", onKnowledgeSwitch);
  ui.tokenDialog.addEventListener("cancel", (event) => { if (!state.ready) event.preventDefault(); });
  if (window.matchMedia("(min-width: 900px)").matches) ui.settings.open = true;
  setBusy(false);
  start();
})();
