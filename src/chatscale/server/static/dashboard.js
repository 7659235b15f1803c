// chatscale dashboard: polls /dashboard/data once a second and charts the last ten minutes with uPlot
// (vendored; canvas, ~50 KB): wall-clock time axes, value axes with units, one cursor shared by all
// charts. The server keeps the history (one row a second), so a page opened now starts full.
/* global uPlot */
"use strict";

const WINDOW_S = 600;
const HEIGHT = 200;
const TIME_STEPS = [1, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600]; // seconds between time-axis ticks
const $ = (id) => document.getElementById(id);

// Each chart: series are [row field, label, colour, dashed?]; `unit` formats values and names the axis;
// `min` fixes the top of the axis at least there (1 = 100%), `reference` draws a dashed line there.
const CHARTS = [
  { id: "kv", title: "KV cache, share of pages", unit: "pct", axis: "% of KV pages", min: 1, series: [
    ["kv_live", "live (held by running requests)", "#10a37f"], ["kv_cached", "cached, reclaimable", "#8e7cc3"]] },
  { id: "load", title: "Load (what the gateway routes on)", unit: "pct", axis: "% of capacity", min: 1,
    reference: 1, series: [["load", "load", "#d1242f"]] },
  { id: "batch", title: "Batch size", unit: "num", axis: "sequences per step", series: [
    ["batch_sequences", "sequences", "#0969da"]] },
  { id: "step-tokens", title: "Tokens per step", unit: "num", axis: "tokens per step", series: [
    ["batch_tokens", "tokens", "#0969da"]] },
  { id: "intensity", title: "Arithmetic intensity vs ridge point", unit: "num", axis: "FLOPs per byte (log)",
    log: true, series: [["intensity", "achieved", "#bf8700"], ["ridge", "ridge point", "#6e7781", true]] },
  { id: "tokens", title: "Tokens per second", unit: "num", axis: "tokens / s", series: [
    ["tokens_per_s", "generated", "#10a37f"], ["prompt_tokens_per_s", "prompt", "#8e7cc3"]] },
  { id: "ttft", title: "Time to first token (last 10 s)", unit: "s", series: [
    ["ttft_p50", "p50", "#0969da"], ["ttft_p99", "p99", "#d1242f"]] },
  { id: "itl", title: "Inter-token latency (last 10 s)", unit: "s", series: [
    ["itl_p50", "p50", "#0969da"], ["itl_p99", "p99", "#d1242f"]] },
  { id: "queue", title: "Requests", unit: "num", axis: "requests; preemptions / s", series: [
    ["running", "running", "#10a37f"], ["waiting", "waiting (queued)", "#d1242f"],
    ["preemptions_per_s", "preempted per s", "#bf8700", true]] },
  { id: "hits", title: "Prefix-cache hit rate (last 10 s)", unit: "pct", axis: "% of prompt tokens", min: 1,
    series: [["hit_rate", "hit rate", "#10a37f"]] },
  { id: "util", title: "MFU, MBU while stepping; busy share", unit: "pct", axis: "% of peak; busy: % of time",
    min: 1, reference: 1, series: [
      ["mfu", "MFU", "#bf8700"], ["mbu", "MBU", "#0969da"], ["busy", "busy", "#6e7781", true]] },
];

let rows = [];
let lastT = 0;
let interval = 1;
let serverNow = Date.now() / 1000; // the server's clock at the last poll: the right edge of every chart
let idle = []; // [from, to] spans (seconds since the epoch) with no engine step for over two intervals

// ---- numbers and times as people read them ------------------------------------------------------
function number(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return `${+(v / 1e6).toPrecision(3)}M`;
  if (a >= 1e4) return `${+(v / 1e3).toPrecision(3)}k`;
  return `${+v.toPrecision(3)}`;
}

function format(v, unit) {
  if (v === null || v === undefined) return "–";
  if (unit === "pct") return `${(v * 100).toFixed(1)}%`;
  if (unit === "s") return v < 1 ? `${(v * 1000).toFixed(1)} ms` : `${v.toFixed(2)} s`;
  return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);
}

const clock = (t, seconds) => new Date(t * 1000).toLocaleTimeString([], {
  hour: "2-digit", minute: "2-digit", ...(seconds ? { second: "2-digit" } : {}), hourCycle: "h23" });

// Tick labels of the value axis; latency switches to ms when the axis stays under a second.
function tickLabels(chart, splits, top) {
  if (chart.unit === "pct") return splits.map((v) => `${+(v * 100).toFixed(1)}%`);
  if (chart.unit === "s") {
    return splits.map((v) => (top < 1 ? `${+(v * 1000).toPrecision(3)} ms` : `${+v.toPrecision(3)} s`));
  }
  return splits.map(number);
}

function niceCeil(v) {
  if (!(v > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * step).find((c) => c >= v * 1.0001) || 10 * step;
}

// ---- rows to uPlot's columns --------------------------------------------------------------------
// Two things look alike in the rows and must not be drawn alike: a short hole (a second without a step
// between busy ones) is spanned, and an idle stretch (no step for more than two sampling intervals) is
// a gap, shaded and labelled "idle" by drawIdle. Rows missing altogether (the server was not
// sampling) break the lines too.
function columns(keys) {
  const ts = [], cols = keys.map(() => []);
  rows.forEach((r, i) => {
    if (i && r.t - rows[i - 1].t > 2 * interval) {
      ts.push(rows[i - 1].t + interval);
      cols.forEach((c) => c.push(null));
    }
    ts.push(r.t);
    keys.forEach((k, j) => cols[j].push(r[k]));
  });
  for (const col of cols) spanShortHoles(col);
  return [ts, ...cols];
}

function spanShortHoles(col) {
  for (let i = 0; i < col.length; i++) {
    if (col[i] !== null) continue;
    let j = i;
    while (j < col.length && col[j] === null) j++;
    if (j - i <= 2 && i > 0 && j < col.length) col.fill(undefined, i, j); // undefined: uPlot joins over it
    i = j;
  }
}

function idleSpans() {
  const spans = [];
  let from = null;
  rows.forEach((r, i) => {
    const stepped = r.busy > 0;
    if (!stepped && from === null) from = r.t;
    if ((stepped || i === rows.length - 1) && from !== null) {
      const to = stepped ? rows[i - 1].t : r.t;
      if (to - from + interval > 2 * interval) spans.push([from, to]);
      from = null;
    }
  });
  return spans;
}

// ---- drawing ------------------------------------------------------------------------------------
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function drawIdle(u) {
  const { ctx } = u;
  const { top, height, left, width } = u.bbox;
  ctx.save();
  ctx.font = `${11 * uPlot.pxRatio}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  for (const [from, to] of idle) {
    const x0 = Math.max(left, u.valToPos(from, "x", true));
    const x1 = Math.min(left + width, u.valToPos(to, "x", true));
    if (x1 <= x0) continue;
    ctx.fillStyle = css("--idle");
    ctx.fillRect(x0, top, x1 - x0, height);
    const minutes = (to - from + interval) / 60;
    const note = minutes >= 1 ? `idle ${minutes.toFixed(minutes < 10 ? 1 : 0)} min` : "idle";
    if (ctx.measureText(note).width + 8 * uPlot.pxRatio < x1 - x0) {
      ctx.fillStyle = css("--muted");
      ctx.fillText(note, x0 + 4 * uPlot.pxRatio, top + 4 * uPlot.pxRatio);
    }
  }
  ctx.restore();
}

function drawReference(u, chart) {
  if (!chart.reference) return;
  const y = u.valToPos(chart.reference, "y", true);
  const { ctx } = u;
  ctx.save();
  ctx.strokeStyle = css("--muted");
  ctx.setLineDash([2 * uPlot.pxRatio, 4 * uPlot.pxRatio]);
  ctx.beginPath();
  ctx.moveTo(u.bbox.left, y);
  ctx.lineTo(u.bbox.left + u.bbox.width, y);
  ctx.stroke();
  ctx.restore();
}

// The y range: [0, a round top] (at least chart.min); log charts: whole decades around the data.
function yRange(chart) {
  return (u, lo, hi) => {
    if (chart.log) {
      const a = lo > 0 ? Math.floor(Math.log10(lo)) : 0;
      const b = hi > 0 ? Math.max(a + 1, Math.ceil(Math.log10(hi))) : a + 1;
      return [10 ** a, 10 ** b];
    }
    // A share's axis is 0-100%; a reading above (busy when a step straddles two samples, MBU past the
    // measured peak) stretches it only to the next 10%, and the dashed line still marks 100%.
    return [0, chart.min ? Math.max(chart.min, Math.ceil(hi * 10 - 1e-9) / 10) : niceCeil(hi)];
  };
}

function decades(u, axisIdx, lo, hi) {
  const out = [];
  for (let e = Math.round(Math.log10(lo)); 10 ** e <= hi * 1.0001; e++) out.push(10 ** e);
  return out;
}

// The axes' tick labels, as drawn, also go into the chart's text description (screen readers, tests).
function describe(chart) {
  const idleText = idle.map(([a, b]) => `${clock(a, true)}–${clock(b, true)}`).join(", ");
  chart.desc.textContent = `Time axis (local time): ${chart.ticks.x.join(", ")}. `
    + `Value axis (${chart.axisLabel}): ${chart.ticks.y.join(", ")}.`
    + (idleText ? ` Idle, no engine step: ${idleText}.` : "");
}

function options(chart, width) {
  const muted = css("--muted"), line = css("--line");
  const axis = { stroke: muted, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1, size: 4 },
                 font: "11px system-ui, sans-serif", labelFont: "11px system-ui, sans-serif" };
  return {
    width, height: HEIGHT,
    padding: [10, 14, 0, 0], // the right edge is "now": no label needs the room uPlot keeps by default
    legend: { show: false },
    cursor: { sync: { key: "dashboard" }, points: { size: 5 } },
    scales: { x: { time: true, range: () => [serverNow - WINDOW_S, serverNow] },
              y: { range: yRange(chart), ...(chart.log ? { distr: 3, log: 10 } : {}) } },
    axes: [
      { ...axis, label: "local time", labelSize: 16, size: 26, space: 60, incrs: TIME_STEPS,
        values: (u, splits) => (chart.ticks.x = splits.map((t) => clock(t, splits.some((s) => s % 60)))) },
      { ...axis, label: () => chart.axisLabel, labelSize: 18, size: 52,
        ...(chart.log ? { splits: decades } : {}),
        values: (u, splits) => (chart.ticks.y = tickLabels(chart, splits, u.scales.y.max)) },
    ],
    series: [{}, ...chart.series.map(([, label, colour, dashed]) => ({
      label, stroke: colour, width: 1.6, ...(dashed ? { dash: [5, 4] } : {}), points: { show: false } }))],
    hooks: {
      drawClear: [drawIdle],
      draw: [(u) => { drawReference(u, chart); describe(chart); }],
      setCursor: [(u) => showValues(chart, u.cursor.idx)],
    },
  };
}

function build() {
  for (const chart of CHARTS) {
    const fig = document.createElement("figure");
    fig.className = "chart";
    fig.id = `chart-${chart.id}`;
    const caption = document.createElement("figcaption");
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = chart.title;
    const when = document.createElement("span");
    when.className = "muted when";
    const legend = document.createElement("span");
    legend.className = "legend";
    for (const [key, label, colour, dashed] of chart.series) {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch" + (dashed ? " dashed" : "");
      swatch.style.borderColor = colour; // CSSOM, which the page's CSP allows (style attributes it refuses)
      const value = document.createElement("span");
      value.className = "value";
      value.dataset.series = key;
      value.textContent = "–";
      item.append(swatch, `${label} `, value);
      legend.append(item);
    }
    caption.append(title, when, legend);
    const plot = document.createElement("div");
    plot.className = "plot";
    plot.setAttribute("role", "img");
    plot.setAttribute("aria-label", chart.title);
    const desc = document.createElement("p");
    desc.className = "axes-text";
    desc.id = `axes-${chart.id}`;
    plot.setAttribute("aria-describedby", desc.id);
    fig.append(caption, plot, desc);
    $("charts").append(fig);
    chart.node = fig;
    chart.desc = desc;
    chart.ticks = { x: [], y: [] };
    chart.axisLabel = chart.axis || "latency";
    chart.keys = chart.series.map(([key]) => key);
    chart.plot = new uPlot(options(chart, plot.clientWidth || 400), columns(chart.keys), plot);
    new ResizeObserver(() => chart.plot.setSize({ width: plot.clientWidth, height: HEIGHT })).observe(plot);
  }
}

// The legend's numbers: at the cursor while it is over a chart, else the latest row.
function showValues(chart, idx) {
  const hovering = idx !== null && idx !== undefined;
  const data = chart.plot ? chart.plot.data : null;
  chart.node.querySelector(".when").textContent = hovering && data ? `at ${clock(data[0][idx], true)}` : "latest";
  chart.keys.forEach((key, j) => {
    const v = hovering && data ? data[j + 1][idx] : rows.length ? rows[rows.length - 1][key] : null;
    chart.node.querySelector(`.value[data-series="${key}"]`).textContent = format(v, chart.unit);
  });
}

function draw() {
  rows = rows.filter((r) => r.t >= serverNow - WINDOW_S);
  idle = idleSpans();
  for (const chart of CHARTS) {
    if (chart.unit === "s") {
      const top = Math.max(0, ...rows.flatMap((r) => chart.keys.map((k) => r[k] || 0)));
      chart.axisLabel = top < 1 ? "latency, ms" : "latency, s";
    }
    chart.plot.setData(columns(chart.keys));
    if (chart.plot.cursor.idx === null || chart.plot.cursor.idx === undefined) showValues(chart, null);
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
    interval = data.interval_s;
    serverNow = data.now;
    rows.push(...data.rows);
    if (data.rows.length) lastT = data.rows[data.rows.length - 1].t;
    draw();
    $("status").textContent = `updated ${clock(data.now, true)}`;
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
