// chatscale chat page: conversations in localStorage, answers streamed from /v1/chat/completions.
// Plain browser APIs only (fetch + ReadableStream for SSE, AbortController for Stop), so the page
// works offline and against any OpenAI-compatible server that serves it.
"use strict";

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
const settingFields = { model: "model", system: "system", temperature: "temperature",
                        top_p: "top-p", max_tokens: "max-tokens", api_key: "api-key" };

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

// ---- rendering (textContent only: model output is never parsed as HTML) ------------------------
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderList() {
  const nav = $("conversations");
  nav.replaceChildren(...conversations.map((c) => {
    const item = el("div", "conv" + (c.id === currentId ? " active" : ""));
    const open = el("button", "conv-title", c.title);
    open.type = "button";
    open.title = c.title;
    open.onclick = () => { if (!controller) { currentId = c.id; render(); } };
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

function messageNode(m) {
  const node = el("div", `msg ${m.role}` + (m.error ? " error" : ""));
  node.append(el("div", "role", m.role === "user" ? "You" : "Assistant"));
  node.append(el("div", "content", m.content));
  node.append(el("div", "meta", m.meta || ""));
  return node;
}

function renderMessages() {
  const c = current();
  const box = $("messages");
  const msgs = c ? c.messages : [];
  box.replaceChildren(...(msgs.length ? msgs.map(messageNode) : [el("p", "empty", EMPTY)]));
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
}

// ---- streaming ----------------------------------------------------------------------------------
// Reads an OpenAI SSE stream: events are separated by a blank line, payloads follow "data:".
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

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

function requestBody(conv, settings) {
  const history = conv.messages.filter((m) => !m.error && m.content).map((m) => ({ role: m.role, content: m.content }));
  const messages = settings.system.trim() ? [{ role: "system", content: settings.system.trim() }, ...history] : history;
  const body = { model: settings.model, messages, stream: true, stream_options: { include_usage: true } };
  for (const key of ["temperature", "top_p", "max_tokens"]) {
    if (settings[key] !== "") body[key] = Number(settings[key]);
  }
  return body;
}

async function send(text) {
  let conv = current();
  if (!conv) {
    conv = { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()), title: text.slice(0, 48), messages: [] };
    conversations.unshift(conv);
    currentId = conv.id;
  }
  conv.messages.push({ role: "user", content: text });
  const body = requestBody(conv, readSettings());
  const answer = { role: "assistant", content: "" };
  conv.messages.push(answer);
  save();
  render();
  const node = $("messages").lastElementChild;
  const content = node.querySelector(".content");
  node.classList.add("streaming");

  controller = new AbortController();
  setStreaming(true);
  setStatus("");
  const t0 = performance.now();
  let tFirst = null, chunks = 0, usage = null;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp.body)) {
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        tFirst = tFirst ?? performance.now();
        chunks += 1;
        answer.content += delta.content;
        content.textContent = answer.content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    const tokens = usage ? usage.completion_tokens : chunks;
    const decode = tFirst !== null && tokens > 1 ? (tokens - 1) / ((performance.now() - tFirst) / 1000) : null;
    answer.meta = `${tokens} tokens` + (tFirst !== null ? ` \u00b7 first token ${((tFirst - t0) / 1000).toFixed(2)} s` : "")
      + (decode ? ` \u00b7 ${decode.toFixed(1)} tok/s` : "");
  } catch (err) {
    if (err.name === "AbortError") {
      answer.meta = "stopped";
    } else {
      answer.error = true;
      if (!answer.content) answer.content = err.message;
      answer.meta = answer.content === err.message ? "failed" : `failed: ${err.message}`;
      node.classList.add("error");
      setStatus(err.message, true);
    }
  } finally {
    controller = null;
    node.classList.remove("streaming");
    node.querySelector(".meta").textContent = answer.meta || "";
    content.textContent = answer.content;
    setStreaming(false);
    save();
    renderList();
    $("prompt").focus();
  }
}

// ---- wiring -------------------------------------------------------------------------------------
function autoGrow() {
  const p = $("prompt");
  p.style.height = "auto";
  p.style.height = Math.min(p.scrollHeight, 200) + "px";
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  autoGrow();
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("prompt").addEventListener("input", autoGrow);
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => { currentId = null; render(); $("prompt").focus(); });
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
