// Copy text: the Clipboard API where the browser offers it (HTTPS or localhost), otherwise a selected
// off-screen textarea and execCommand("copy") — e.g. the page opened on a LAN address over plain HTTP.
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) { /* refused (permissions, focus): try the fallback */ }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.readOnly = true;
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  try {
    return document.execCommand("copy");
  } finally {
    area.remove();
  }
}
