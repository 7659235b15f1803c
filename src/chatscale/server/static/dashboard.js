// chatscale dashboard: polls /dashboard/data once a second and draws the last ten minutes as SVG.
// The server keeps the history (one row a second), so a page opened now starts full.
"use strict";

const WINDOW_S = 600;
const W = 600, H = 140; // the SVG's own coordinates; CSS stretches them to the card
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// Each chart: series are [row field, label, colour, dashed?]; `max` fixes the top of the y axis.
const CHARTS = [
  { id: "kv", title: "KV cache, share of pages", unit: "pct", max: 1, series: [
    ["kv_live", "live (held by running requests)", "#10a37f"], ["kv_cached", "cached, reclaimable", "#8e7cc3"]] },
  { id: "load", title: "Load (what the gateway routes on)", unit: "num", series: [
    ["load", "load", "#d1242f"]] },
  { id: "batch", title: "Batch size, sequences per step", unit: "num", series: [
    ["batch_sequences", "sequences", "#0969da"]] },
  { id: "step-tokens", title: "Tokens per step", unit: "num", series: [
    ["batch_tokens", "tokens", "#0969da"]] },
  { id: "intensity", title: "Arithmetic intensity vs ridge point, FLOPs/byte (log)", unit: "num", log: true, series: [
    ["intensity", "achieved", "#bf8700"], ["ridge", "ridge point", "#6e7781", true]] },
  { id: "tokens", title: "Tokens per second", unit: "num", series: [
    ["tokens_per_s", "generated", "#10a37f"], ["prompt_tokens_per_s", "prompt", "#8e7cc3"]] },
  { id: "ttft", title: "Time to first token (last 10 s)", unit: "s", series: [
    ["ttft_p50", "p50", "#0969da"], ["ttft_p99", "p99", "#d1242f"]] },
  { id: "itl", title: "Inter-token latency (last 10 s)", unit: "s", series: [
    ["itl_p50", "p50", "#0969da"], ["itl_p99", "p99", "#d1242f"]] },
  { id: "queue", title: "Requests", unit: "num", series: [
    ["running", "running", "#10a37f"], ["waiting", "waiting (queued)", "#d1242f"],
    ["preemptions_per_s", "preempted per s", "#bf8700", true]] },
  { id: "hits", title: "Prefix-cache hit rate, tokens (last 10 s)", unit: "pct", max: 1, series: [
    ["hit_rate", "hit rate", "#10a37f"]] },
  { id: "util", title: "MFU, MBU while stepping; busy share", unit: "pct", series: [
    ["mfu", "MFU", "#bf8700"], ["mbu", "MBU", "#0969da"], ["busy", "busy", "#6e7781", true]] },
];

let rows = [];
let lastT = 0;

function el(tag, attrs = {}, ns = null) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function format(v, unit) {
  if (v === null || v === undefined) return "–";
  if (unit === "pct") return `${(v * 100).toFixed(1)}%`;
  if (unit === "s") return v < 1 ? `${(v * 1000).toFixed(1)} ms` : `${v.toFixed(2)} s`;
  return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);
}

function build() {
  for (const chart of CHARTS) {
    const fig = el("figure", { class: "chart", id: `chart-${chart.id}` });
    const caption = el("figcaption");
    const title = el("span", { class: "title" });
    title.textContent = chart.title;
    const legend = el("span", { class: "legend" });
    for (const [key, label, colour] of chart.series) {
      const item = el("span");
      item.append(el("span", { class: "swatch", style: `background:${colour}` }), `${label} `);
      const value = el("span", { class: "value", "data-series": key });
      value.textContent = "–";
      item.append(value);
      legend.append(item);
    }
    const scale = el("span", { class: "muted scale" });
    caption.append(title, scale, legend);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
                            "aria-label": chart.title }, SVG);
    for (const f of [0, 0.25, 0.5, 0.75, 1]) {
      svg.append(el("path", { class: "grid", d: `M0 ${H * f} L${W} ${H * f}` }, SVG));
    }
    for (const [key, , colour, dashed] of chart.series) {
      svg.append(el("path", { "data-series": key, stroke: colour, class: dashed ? "dashed" : "", d: "" }, SVG));
    }
    fig.append(caption, svg);
    $("charts").append(fig);
    chart.node = fig;
  }
}

// The y axis: [0, a round maximum] or, for log charts, whole decades around the data.
function yScale(chart, values) {
  if (chart.log) {
    const logs = values.filter((v) => v > 0).map(Math.log10);
    const lo = logs.length ? Math.floor(Math.min(...logs)) : 0;
    const hi = logs.length ? Math.max(lo + 1, Math.ceil(Math.max(...logs))) : 1;
    return { y: (v) => (v > 0 ? H - ((Math.log10(v) - lo) / (hi - lo)) * H : null),
             label: `10^${lo} … 10^${hi}` };
  }
  let top = chart.max ?? Math.max(0, ...values);
  if (!chart.max) {
    const step = 10 ** Math.floor(Math.log10(top || 1));
    top = Math.ceil((top || 1) / step) * step;
  }
  return { y: (v) => H - (v / top) * H, label: `0 … ${format(top, chart.unit)}` };
}

function draw(now) {
  const from = now - WINDOW_S;
  rows = rows.filter((r) => r.t >= from);
  const x = (t) => (((t - from) / WINDOW_S) * W).toFixed(1);
  for (const chart of CHARTS) {
    const values = rows.flatMap((r) => chart.series.map(([key]) => r[key])).filter((v) => v !== null);
    const scale = yScale(chart, values);
    chart.node.querySelector(".scale").textContent = scale.label;
    for (const [key] of chart.series) {
      let d = "", pen = "M";
      for (const r of rows) {
        const y = r[key] === null ? null : scale.y(r[key]);
        if (y === null) { pen = "M"; continue; }
        d += `${pen}${x(r.t)} ${y.toFixed(1)} `;
        pen = "L";
      }
      chart.node.querySelector(`path[data-series="${key}"]`).setAttribute("d", d.trim());
      const latest = rows.length ? rows[rows.length - 1][key] : null;
      chart.node.querySelector(`.value[data-series="${key}"]`).textContent = format(latest, chart.unit);
    }
  }
}

// The API key the chat page saved, when the server has one (`chatscale serve --api-key`).
function headers() {
  const key = (JSON.parse(localStorage.getItem("chatscale.settings") || "{}").api_key || "").trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function poll() {
  try {
    const resp = await fetch(`dashboard/data?since=${lastT}`, { headers: headers() });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const data = await resp.json();
    rows.push(...data.rows);
    if (data.rows.length) lastT = data.rows[data.rows.length - 1].t;
    draw(data.now);
    $("status").textContent = `updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
    $("status").classList.remove("error");
  } catch (err) {
    $("status").textContent = `cannot read the server's numbers: ${err.message}`;
    $("status").classList.add("error");
  } finally {
    setTimeout(poll, 1000);
  }
}

build();
poll();
