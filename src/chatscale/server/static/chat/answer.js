// Drawing one assistant message: its text as Markdown (a structured-output answer as a JSON block),
// then its tool calls, each a collapsible "called tool X with {...}".
import { fenced, renderMarkdown } from "./markdown.js";

function pretty(json) {
  try {
    return JSON.stringify(JSON.parse(json), null, 2);
  } catch (_) {
    return json; // still streaming, or not JSON after all: shown as it came
  }
}

// The Markdown shown for `message`: JSON answers (response_format json_object / json_schema) as a
// highlighted JSON block, indented once complete.
function source(message, streaming) {
  if (message.format !== "json") return message.content;
  return message.content ? fenced(streaming ? message.content : pretty(message.content), "json") : "";
}

function toolCallNode(call) {
  const box = document.createElement("details");
  box.className = "tool-call";
  const summary = document.createElement("summary");
  const name = document.createElement("code");
  name.textContent = call.function.name || "\u2026";
  const args = document.createElement("code");
  args.className = "args";
  args.textContent = call.function.arguments || "{}";
  summary.append("called tool ", name, " with ", args);
  const body = document.createElement("div");
  renderMarkdown(body, fenced(pretty(call.function.arguments || "{}"), "json"));
  box.append(summary, body);
  return box;
}

export function paintAnswer(node, message, streaming = false) {
  renderMarkdown(node.querySelector(".content"), source(message, streaming), streaming);
  const calls = node.querySelector(".tool-calls");
  const open = [...calls.querySelectorAll("details")].map((d) => d.open); // kept across repaints
  calls.replaceChildren(...(message.tool_calls || []).filter(Boolean).map(toolCallNode));
  calls.querySelectorAll("details").forEach((d, i) => { d.open = Boolean(open[i]); });
}

// `fn` at most once per animation frame, however often it is asked for; `cancel` drops a pending call.
export function oncePerFrame(fn) {
  let frame = 0;
  const request = () => {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; fn(); });
  };
  request.cancel = () => { cancelAnimationFrame(frame); frame = 0; };
  return request;
}
