// chatscale chat page: conversations in localStorage, answers streamed from /v1/chat/completions and
// drawn as sanitised Markdown. Plain browser APIs (fetch + ReadableStream for SSE, AbortController for
// Stop) and three vendored libraries, all served by chatscale: the page works offline.
import { paintAnswer, oncePerFrame } from "./answer.js";
import { copyText } from "./clipboard.js";
import { applyChunk, footer, sseEvents } from "./stream.js";

const STORE = "chatscale.conversations";
const SETTINGS = "chatscale.settings";
const EMPTY = "Ask anything. Answers stream as the server generates them.";
const $ = (id) => document.getElementById(id);

let conversations = JSON.parse(localStorage.getItem(STORE) || "[]");
let currentId = conversations.length ? conversations[0].id : null;
let controller = null; // the AbortController of the answer being streamed, if any

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
}

function current() {
  return conversations.find((c) => c.id === currentId) || null;
}

// ---- settings ---------------------------------------------------------------------------------
const settingFields = { model: "model", system: "system", temperature: "temperature", top_p: "top-p",
                        max_tokens: "max-tokens", tools: "tools", response_format: "response-format",
                        api_key: "api-key" };

function readSettings() {
  const s = {};
  for (const [key, id] of Object.entries(settingFields)) s[key] = $(id).value;
  return s;
}

function restoreSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const [key, id] of Object.entries(settingFields)) {
    if (key !== "model" && saved[key] !== undefined) $(id).value = saved[key];
  }
  return saved;
}

function saveSettings() {
  localStorage.setItem(SETTINGS, JSON.stringify(readSettings()));
}

function parseSetting(name, text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`${name} (Settings) is not valid JSON: ${err.message}`);
  }
}

// The request's fields from the settings (throws, naming the field, on JSON that does not parse).
function requestOptions(s) {
  const body = { model: s.model, stream: true, stream_options: { include_usage: true } };
  for (const key of ["temperature", "top_p", "max_tokens"]) {
    if (s[key] !== "") body[key] = Number(s[key]);
  }
  if (s.tools.trim()) body.tools = parseSetting("Tools", s.tools);
  if (s.response_format.trim()) body.response_format = parseSetting("Response format", s.response_format);
  return { body, system: s.system.trim() };
}

// The server's API key, when it has one (`chatscale serve --api-key`).
function headers() {
  const key = $("api-key").value.trim();
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` }
             : { "Content-Type": "application/json" };
}

async function loadModels(preferred) {
  try {
    const resp = await fetch("v1/models", { headers: headers() });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const ids = (await resp.json()).data.map((m) => m.id);
    $("model").replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(preferred)) $("model").value = preferred;
  } catch (err) {
    setStatus(`Could not list models: ${err.message}`, true);
  }
}

// ---- rendering ----------------------------------------------------------------------------------
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(action, text, title) {
  const b = el("button", action, text);
  b.type = "button";
  b.dataset.action = action;
  if (title) b.title = title;
  return b;
}

function setMenu(open) {
  document.body.classList.toggle("menu-open", open);
  $("menu-toggle").setAttribute("aria-expanded", String(open));
}

function renderList() {
  $("conversations").replaceChildren(...conversations.map((c) => {
    const item = el("div", "conv" + (c.id === currentId ? " active" : ""));
    const open = el("button", "conv-title", c.title);
    open.type = "button";
    open.title = c.title;
    open.onclick = () => { if (!controller) { currentId = c.id; setMenu(false); render(); } };
    const del = el("button", "conv-delete", "\u00d7");
    del.type = "button";
    del.title = "Delete conversation";
    del.onclick = () => {
      if (controller && c.id === currentId) return;
      conversations = conversations.filter((x) => x.id !== c.id);
      if (currentId === c.id) currentId = conversations.length ? conversations[0].id : null;
      save();
      render();
    };
    item.append(open, del);
    return item;
  }));
}

// User text is shown as typed; an answer as Markdown. Copy on every message, Edit on the user's,
// Regenerate on the last answer.
function messageNode(m, index, last) {
  const node = el("div", `msg ${m.role}` + (m.error ? " error" : ""));
  node.dataset.index = index;
  node.append(el("div", "role", m.role === "user" ? "You" : "Assistant"), el("div", "content"));
  const actions = el("div", "actions");
  actions.append(button("copy", "Copy", "Copy the message"));
  if (m.role === "user") {
    node.querySelector(".content").textContent = m.content;
    actions.append(button("edit", "Edit", "Edit and send again from here"));
  } else {
    node.append(el("div", "tool-calls"));
    paintAnswer(node, m);
    if (last) actions.append(button("regenerate", "Regenerate", "Answer the last message again"));
  }
  if (m.role !== "user") node.append(el("div", "meta", m.meta || ""));
  node.append(actions);
  return node;
}

function renderMessages() {
  const msgs = current() ? current().messages : [];
  const box = $("messages");
  box.replaceChildren(...(msgs.length ? msgs.map((m, i) => messageNode(m, i, i === msgs.length - 1))
                                      : [el("p", "empty", EMPTY)]));
  box.scrollTop = box.scrollHeight;
}

function render() {
  renderList();
  renderMessages();
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("new-chat").disabled = on;
  document.body.classList.toggle("streaming", on);
}

// ---- sending ------------------------------------------------------------------------------------
async function errorText(resp) {
  let detail = "";
  try {
    const body = await resp.json();
    detail = (body.error && (body.error.message || body.error)) || body.detail || "";
    if (typeof detail !== "string") detail = JSON.stringify(detail);
  } catch (_) { /* not JSON: the status says enough */ }
  const retry = resp.headers.get("Retry-After");
  return `Error ${resp.status}${detail ? ": " + detail : ""}${retry ? ` (retry after ${retry} s)` : ""}`;
}

// The conversation as the API takes it: the system prompt, then every message that has text (the page
// does not run tools, so an answer's tool calls are shown but not sent back).
function history(conv, system) {
  const turns = conv.messages.filter((m) => !m.error && m.content).map((m) => ({ role: m.role, content: m.content }));
  return system ? [{ role: "system", content: system }, ...turns] : turns;
}

function options() {
  try {
    return requestOptions(readSettings());
  } catch (err) {
    setStatus(err.message, true);
    return null;
  }
}

// Starts answering `text` in the current conversation (a new one if none); false if it could not start.
function send(text) {
  const opts = options();
  if (!opts || controller) return false;
  let conv = current();
  if (!conv) {
    conv = { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()), title: text.slice(0, 48), messages: [] };
    conversations.unshift(conv);
    currentId = conv.id;
  }
  conv.messages.push({ role: "user", content: text });
  stream(conv, opts);
  return true;
}

// Drop the messages from `index` on (an answer to regenerate, or a user message being replaced).
function truncate(index) {
  current().messages.splice(index);
}

function regenerate(index) {
  const opts = options();
  if (!opts || controller) return;
  truncate(index);
  stream(current(), opts);
}

function startEdit(node, index) {
  const area = el("textarea", "edit-box");
  area.value = current().messages[index].content;
  area.rows = Math.min(10, area.value.split("\n").length + 1);
  const bar = el("div", "edit-bar");
  bar.append(button("edit-cancel", "Cancel"), button("edit-send", "Send"));
  node.querySelector(".content").replaceChildren(area, bar);
  area.focus();
}

function finishEdit(node, index) {
  const text = node.querySelector(".edit-box").value.trim();
  if (!text || controller || !options()) return;
  truncate(index);
  send(text);
}

async function stream(conv, opts) {
  const body = { ...opts.body, messages: history(conv, opts.system) };
  const json = /^json/.test((body.response_format && body.response_format.type) || "");
  const answer = { role: "assistant", content: "", ...(json ? { format: "json" } : {}) };
  conv.messages.push(answer);
  save();
  render();
  const node = $("messages").lastElementChild;
  node.classList.add("streaming");
  const box = $("messages");
  const paint = oncePerFrame(() => {
    const following = box.scrollHeight - box.scrollTop - box.clientHeight < 80; // the reader is at the end
    paintAnswer(node, answer, true);
    if (following) box.scrollTop = box.scrollHeight;
  });

  controller = new AbortController();
  setStreaming(true);
  setStatus("");
  const timing = { start: performance.now(), first: null, end: null, chunks: 0 };
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp.body)) {
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (applyChunk(answer, chunk)) {
        timing.first = timing.first ?? performance.now();
        timing.chunks += 1;
        paint();
      }
    }
    timing.end = performance.now();
    answer.meta = footer(answer, timing);
  } catch (err) {
    if (err.name === "AbortError") {
      answer.meta = "stopped";
    } else {
      answer.error = true;
      if (!answer.content) answer.content = err.message;
      answer.meta = answer.content === err.message ? "failed" : `failed: ${err.message}`;
      setStatus(err.message, true);
    }
  } finally {
    paint.cancel();
    controller = null;
    setStreaming(false);
    save();
    render();
    $("prompt").focus();
  }
}

// ---- wiring -------------------------------------------------------------------------------------
function autoGrow() {
  const p = $("prompt");
  p.style.height = "auto";
  p.style.height = Math.min(p.scrollHeight, 200) + "px";
}

// Briefly says on the button whether the copy worked.
function flash(btn, ok) {
  const text = btn.textContent;
  btn.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => { btn.textContent = text; }, 1500);
}

async function onMessageAction(e) {
  const btn = e.target.closest("button[data-action]");
  if (!btn) return;
  const node = btn.closest(".msg");
  const index = Number(node.dataset.index);
  const m = current().messages[index];
  switch (btn.dataset.action) {
    case "copy": return flash(btn, await copyText(m.content || JSON.stringify(m.tool_calls || [], null, 2)));
    case "copy-code": return flash(btn, await copyText(btn.closest(".code-block").querySelector("code").textContent));
    case "regenerate": return regenerate(index);
    case "edit": return startEdit(node, index);
    case "edit-send": return finishEdit(node, index);
    case "edit-cancel": return renderMessages();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (text && send(text)) {
    $("prompt").value = "";
    autoGrow();
  }
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("prompt").addEventListener("input", autoGrow);
$("messages").addEventListener("click", onMessageAction);
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => { currentId = null; setMenu(false); render(); $("prompt").focus(); });
$("menu-toggle").addEventListener("click", () => setMenu(!document.body.classList.contains("menu-open")));
$("backdrop").addEventListener("click", () => setMenu(false));
$("settings-toggle").addEventListener("click", () => {
  const open = $("settings").hidden;
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
});
for (const id of Object.values(settingFields)) $(id).addEventListener("change", saveSettings);
$("api-key").addEventListener("change", () => loadModels($("model").value));

const savedSettings = restoreSettings();
render();
loadModels(savedSettings.model);
