// Answers are Markdown written by a model, so untrusted. Three walls keep them inert: markdown-it with
// raw HTML off (a tag in an answer is shown as text, and it makes no javascript: links), DOMPurify over
// the HTML it makes, and the page's Content-Security-Policy (no inline script; see server/pages.py).
/* global markdownit, hljs, DOMPurify */

const md = markdownit({ html: false, linkify: true, highlight: highlightCode });
md.core.ruler.push("align_as_class", alignAsClass);

const PURIFY = { USE_PROFILES: { html: true }, FORBID_ATTR: ["style"], RETURN_DOM_FRAGMENT: true };
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// Highlighting classes for a fenced block in a language highlight.js knows; "" lets markdown-it escape it.
function highlightCode(code, info) {
  const language = info.trim().split(/\s+/)[0].toLowerCase();
  return language && hljs.getLanguage(language)
    ? hljs.highlight(code, { language, ignoreIllegals: true }).value : "";
}

// Table alignment as a class, not a style attribute: the CSP refuses inline styles.
function alignAsClass(state) {
  for (const token of state.tokens) {
    if (token.type !== "th_open" && token.type !== "td_open") continue;
    const align = /text-align:(left|center|right)/.exec(token.attrGet("style") || "");
    if (align) {
      token.attrs = token.attrs.filter(([name]) => name !== "style");
      token.attrJoin("class", `align-${align[1]}`);
    }
  }
}

// While an answer streams, its last line is not rendered if it could still turn into a code fence
// ("`", "``", "```pyt"): an open or closing fence flips everything after it between text and code.
// markdown-it already runs an unclosed fence to the end, so an open code block stays a code block.
const PARTIAL_FENCE = /(^|\n) {0,3}(`+|~+)[^`\n]*$/;

export function streamingSource(text) {
  return text.replace(PARTIAL_FENCE, "$1");
}

// `text` as sanitised HTML in `node`; each code block gets a language label and a copy button,
// each table a scroller (so a wide one scrolls inside the answer, not the page).
export function renderMarkdown(node, text, streaming = false) {
  node.replaceChildren(DOMPurify.sanitize(md.render(streaming ? streamingSource(text) : text), PURIFY));
  for (const pre of node.querySelectorAll("pre")) decorateCode(pre);
  for (const table of node.querySelectorAll("table")) wrap(table, "table-scroll");
}

function decorateCode(pre) {
  const code = pre.querySelector("code");
  if (code) code.classList.add("hljs");
  const language = code && /language-(\S+)/.exec(code.className);
  const box = wrap(pre, "code-block");
  const head = document.createElement("div");
  head.className = "code-head";
  const label = document.createElement("span");
  label.textContent = language ? language[1] : "text";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.dataset.action = "copy-code";
  copy.textContent = "Copy";
  head.append(label, copy);
  box.prepend(head);
}

function wrap(node, className) {
  const box = document.createElement("div");
  box.className = className;
  node.replaceWith(box);
  box.append(node);
  return box;
}

// A code fence around `text` that no run of backticks inside it can close.
export function fenced(text, language) {
  const longest = Math.max(0, ...(text.match(/`+/g) || []).map((run) => run.length));
  const fence = "`".repeat(Math.max(3, longest + 1));
  return `${fence}${language}\n${text}\n${fence}`;
}
