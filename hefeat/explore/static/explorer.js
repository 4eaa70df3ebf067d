// hefeat explorer: a WebGL latent-space view (regl-scatterplot) next to a deep-zoom slide viewer
// (OpenSeadragon), both reading the store through the read-only JSON API of hefeat/explore/server.py.
import createPubSub from "./vendor/pub-sub-es/pub-sub-es.js";

const $ = (id) => document.getElementById(id);
const t0 = performance.now();

// ---- palettes ----------------------------------------------------------------------------------
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
const TAB = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
  "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];
const MISSING = "#c8c8c8";
const BINS = 128;
const hex = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
const toHex = (c) => "#" + c.map((v) => Math.round(v).toString(16).padStart(2, "0")).join("");
function ramp(n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const f = (i / Math.max(n - 1, 1)) * (VIRIDIS.length - 1), k = Math.min(Math.floor(f), VIRIDIS.length - 2), u = f - k;
    const a = hex(VIRIDIS[k]), b = hex(VIRIDIS[k + 1]);
    out.push(toHex(a.map((v, j) => v + (b[j] - v) * u)));
  }
  return out;
}
const RAMP = ramp(BINS);
const fmt = (v) => (v === null || v === undefined || Number.isNaN(v)) ? "n/a"
  : (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0)) ? v.toExponential(2) : (+v.toPrecision(3)).toString();
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

// ---- API ---------------------------------------------------------------------------------------
async function getJSON(url) {
  const r = await fetch(url);
  const j = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}
async function postJSON(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const j = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}
const b64 = (s, T) => { const bin = atob(s), u = new Uint8Array(bin.length); for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i); return new T(u.buffer); };
function status(msg, err = false) { $("status").textContent = msg; $("status").className = err ? "err" : ""; }

// Decode a /values or /overlay answer into one colour index per item (last colour = no value) and a legend.
function colouring(v) {
  if (v.kind === "categorical") {
    const codes = b64(v.codes, Int32Array), n = v.categories.length;
    const colors = v.categories.map((_, i) => TAB[i % TAB.length]).concat([MISSING]);
    return { idx: Int32Array.from(codes, (c) => (c < 0 ? n : c)), colors, v };
  }
  const vals = b64(v.values, Float32Array), span = (v.vmax - v.vmin) || 1;
  const idx = Int32Array.from(vals, (x) => (Number.isNaN(x) ? BINS : Math.max(0, Math.min(BINS - 1, Math.floor(((x - v.vmin) / span) * BINS)))));
  return { idx, colors: RAMP.concat([MISSING]), v, vals };
}
function legendHTML(c) {
  const v = c.v;
  let h = `<span class="title">${esc(v.title)}</span>`;
  if (v.kind === "categorical") {
    h += v.categories.map((name, i) => `<span><span class="sw" style="background:${c.colors[i]}"></span>${esc(name)} (${v.counts[i]})</span>`).join("");
  } else {
    const beyond = v.clipped_low + v.clipped_high;
    h += `<span>${fmt(v.vmin)} <span class="ramp" style="background:linear-gradient(to right, ${VIRIDIS.join(",")})"></span> ${fmt(v.vmax)}</span>`;
    const of = v.span_of === "cohort" ? "the cohort's" : "these values'";
    h += `<span class="muted">colours span ${of} 2nd–98th percentile` + (beyond > 0.004 ? `; ${(beyond * 100).toFixed(1)} % of values here lie beyond (range here ${fmt(v.min)}…${fmt(v.max)})` : "") + `</span>`;
  }
  if (v.missing) h += `<span><span class="sw" style="background:${MISSING}"></span>no value (${v.missing})</span>`;
  return h;
}

// ---- state -------------------------------------------------------------------------------------
const S = {
  gen: 0, eid: null, tiling: null, umap: null, n: 0, x: null, y: null, sidx: null, tile: null, slides: [],
  valueOptions: [], color: null, selection: [], neighbours: [], query: null, slideMeta: {}, slide: null,
  overlay: null, overlayItem: null, marks: [], marksItem: null, geometry: {}, firstPaintMs: null, tileInfo: new Map(),
};
window.__explorer = S;

// ---- latent space (regl-scatterplot) -------------------------------------------------------------
let sp = null;
async function initScatter() {
  window.createPubSub = createPubSub;
  await new Promise((ok, fail) => {
    const s = document.createElement("script");
    s.src = "/static/vendor/regl-scatterplot/regl-scatterplot.min.js";
    s.onload = ok; s.onerror = fail;
    document.head.appendChild(s);
  });
  const canvas = $("scatter"), box = $("scatterWrap").getBoundingClientRect();
  try {
    sp = window.createScatterplot.default({
      canvas, width: Math.floor(box.width), height: Math.floor(box.height), pointSize: 4, opacity: 0.85,
      backgroundColor: [0.98, 0.98, 0.98, 1], pointColorActive: [1, 0.1, 0.1, 1], pointColorHover: [0, 0, 0, 1],
      lassoColor: [0.1, 0.1, 0.1, 0.8], lassoMinDelay: 8, lassoMinDist: 2, deselectOnEscape: true,
      showReticle: false, opacityInactiveMax: 0.5,
      // The bundled worker for the spatial index (used above ~1M points) references a minified closure
      // variable and fails; building the KDBush index on the main thread takes ~0.3 s per million points.
      spatialIndexUseWorker: false,
    });
  } catch (e) {
    $("noWebgl").hidden = false;
    throw e;
  }
  S.sp = sp;
  sp.subscribe("pointOver", (i) => showHover(i));
  sp.subscribe("pointOut", () => { $("hover").hidden = true; });
  sp.subscribe("select", ({ points }) => {
    if (points.length === 1 && !S.lassoing) queryNeighbours(S.slides[S.sidx[points[0]]], S.tile[points[0]]);
    else showSelection(Array.from(points));
    S.lassoing = false;
  });
  sp.subscribe("lassoStart", () => { S.lassoing = true; });
  sp.subscribe("deselect", () => showSelection([]));
  new ResizeObserver(() => {
    const b = $("scatterWrap").getBoundingClientRect();
    sp.set({ width: Math.floor(b.width), height: Math.floor(b.height) });
  }).observe($("scatterWrap"));
}

let mouse = [0, 0];
document.addEventListener("mousemove", (e) => { mouse = [e.clientX, e.clientY]; });

function pointSize(n) { return Math.max(1.2, Math.min(6, 600 / Math.sqrt(n))); }

async function loadUmap(uid) {
  const gen = S.gen, t = performance.now();
  clearSelection();
  if (!uid) { sp.clear(); S.umap = null; $("pointCount").textContent = ""; $("legend").innerHTML = ""; return; }
  status("loading map…");
  const meta = await getJSON(`/api/umap/${uid}`);
  const buf = await (await fetch(`/api/umap/${uid}/points.bin`)).arrayBuffer();
  if (gen !== S.gen) return;
  const n = meta.n, f = new Float32Array(buf, 0, 2 * n), ints = new Int32Array(buf, 8 * n, 2 * n);
  const [x0, x1, y0, y1] = meta.bounds, half = Math.max(x1 - x0, y1 - y0) / 2 || 1, cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  S.x = new Float32Array(n); S.y = new Float32Array(n);
  for (let i = 0; i < n; i++) { S.x[i] = (f[i] - cx) / half * 0.95; S.y[i] = (f[n + i] - cy) / half * 0.95; }
  S.sidx = ints.subarray(0, n); S.tile = ints.subarray(n, 2 * n); S.slides = meta.slides; S.n = n; S.umap = meta;
  // this map's k-means clusters can colour the points and overlay the slides (tiles outside the map's sample: no value)
  const opts = S.valueOptions.filter((o) => o.source !== "umap");
  if (meta.clusters) opts.push({ spec: `umap:${uid}:cluster`, source: "umap", label: `k-means cluster (${meta.clusters}) of this map`, units: "cluster id" });
  const keep = [$("colorBy").value, $("overlayBy").value];
  fillValueSelect($("colorBy"), opts, true); fillValueSelect($("overlayBy"), opts, false);
  $("colorBy").value = keep[0]; $("overlayBy").value = keep[1];
  // Above ~50k points the opacity follows the local density and zoom, so dense clusters keep their structure.
  sp.set({ pointSize: pointSize(n), pointColor: ["#37474f"], colorBy: null, opacityBy: n > 50000 ? "density" : null });
  await sp.draw({ x: S.x, y: S.y, valueA: new Int32Array(n) }, { zDataType: "categorical" });
  sp.zoomToOrigin();
  await new Promise((r) => requestAnimationFrame(() => r()));
  S.firstPaintMs = performance.now() - t;
  $("scatter").dataset.rendered = String(n);
  $("pointCount").textContent = meta.what;
  status(meta.stale ? "this map is STALE: the extraction's data changed since it was computed; compute a new one" :
    `map ${uid} (computed ${meta.created || "?"}; drawn in ${Math.round(S.firstPaintMs)} ms)`, !!meta.stale);
  if ($("colorBy").value) await applyColor($("colorBy").value);
}

async function applyColor(spec) {
  const gen = S.gen;
  if (!S.umap) return;
  if (!spec) { sp.set({ pointColor: ["#37474f"], colorBy: null }); $("legend").innerHTML = ""; S.color = null; return; }
  if (spec === "__sql__") { $("sqlRow").hidden = false; return; }
  status("colouring…");
  try {
    const v = await getJSON(`/api/umap/${S.umap.umap_id}/values?value=${encodeURIComponent(spec)}`);
    if (gen !== S.gen) return;
    const c = colouring(v);
    S.color = c;
    sp.set({ pointColor: c.colors, colorBy: "valueA" });
    await sp.draw({ x: S.x, y: S.y, valueA: c.idx }, { zDataType: "categorical", preventFilterReset: true });
    $("legend").innerHTML = legendHTML(c);
    $("legend").dataset.kind = v.kind;
    status(`coloured by ${v.title}`);
  } catch (e) { status(e.message, true); }
}

async function tileInfo(sid, tile) {
  const key = `${S.eid}/${sid}/${tile}`;
  if (!S.tileInfo.has(key)) S.tileInfo.set(key, getJSON(`/api/tile/${S.eid}/${sid}/${tile}`));
  return S.tileInfo.get(key);
}
const QC = ["tissue_frac", "sharpness", "background_frac", "density"];
async function showHover(i) {
  const sid = S.slides[S.sidx[i]], tile = S.tile[i], h = $("hover");
  $("hoverImg").src = `/api/tile/${S.eid}/${sid}/${tile}.png?size=128`;
  const colourLine = S.color ? `<br>${esc(S.color.v.label)}: ${S.color.v.kind === "categorical"
    ? esc(S.color.v.categories[S.color.idx[i]] ?? "no value") : fmt(S.color.vals[i])}` : "";
  $("hoverText").innerHTML = `<b>${esc(sid)}:${tile}</b>${colourLine}`;
  h.hidden = false; h.style.left = mouse[0] + 14 + "px"; h.style.top = mouse[1] + 14 + "px";
  try {
    const t = await tileInfo(sid, tile);
    if ($("hover").hidden) return;
    const labels = Object.entries(t.clinical || {}).slice(0, 6).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ");
    const qc = QC.filter((k) => k in t).map((k) => `${k} ${fmt(t[k])}`).join(", ");
    $("hoverText").innerHTML = `<b>${esc(sid)}:${tile}</b> · patient ${esc(t.patient_id)} · site ${esc(t.site)}${colourLine}` +
      (labels ? `<br>labels: ${labels}` : "") + `<br>QC: ${qc}`;
  } catch (e) { /* the image is enough */ }
}

// ---- selection (lasso) -----------------------------------------------------------------------------
function clearSelection() { S.selection = []; $("selection").innerHTML = ""; $("selSlides").innerHTML = ""; $("selInfo").textContent = "lasso points to list their tiles"; $("showOnSlides").disabled = true; }
function showSelection(points) {
  S.selection = points;
  if (!points.length) { clearSelection(); return; }
  const bySlide = new Map();
  for (const i of points) { const s = S.slides[S.sidx[i]]; bySlide.set(s, (bySlide.get(s) || []).concat([i])); }
  const order = [...bySlide.entries()].sort((a, b) => b[1].length - a[1].length);
  S.selectionBySlide = order;
  $("selInfo").textContent = `${points.length} tiles from ${order.length} slides` + (points.length > 60 ? " (60 shown, evenly spread)" : "");
  $("selSlides").innerHTML = order.slice(0, 30).map(([s, l]) => `<button data-slide="${esc(s)}">${esc(s)}: ${l.length}</button>`).join("");
  const shown = points.length <= 60 ? points : Array.from({ length: 60 }, (_, j) => points[Math.floor((j * points.length) / 60)]);
  $("selection").innerHTML = shown.map((i) => {
    const s = S.slides[S.sidx[i]], t = S.tile[i];
    return `<div class="sel" data-slide="${esc(s)}" data-tile="${t}"><img loading="lazy" src="/api/tile/${S.eid}/${s}/${t}.png?size=96" alt="">${esc(s)}:${t}</div>`;
  }).join("");
  $("showOnSlides").disabled = false;
}
function selectionTilesOn(sid) {
  const hit = (S.selectionBySlide || []).find(([s]) => s === sid);
  return hit ? hit[1].map((i) => S.tile[i]) : [];
}

// ---- neighbours ---------------------------------------------------------------------------------------
async function queryNeighbours(sid, tile) {
  const gen = S.gen;
  S.query = { slide: sid, tile };
  $("queryLabel").textContent = `of ${sid}:${tile}`;
  $("neighbors").innerHTML = "searching…";
  const k = Math.max(1, Math.min(200, parseInt($("k").value, 10) || 12));
  try {
    const j = await getJSON(`/api/neighbors?extraction=${S.eid}&slide=${encodeURIComponent(sid)}&tile=${tile}&k=${k}&exclude=${$("exclude").value}`);
    if (gen !== S.gen) return;
    S.neighbours = j.rows;
    $("buildIndex").hidden = true;
    $("neighbors").innerHTML = `<div class="muted" style="width:100%">distance = ${esc(j.distance)} (index ${esc(j.index_id)})</div>` +
      j.rows.map((r) => `<div class="nb" data-slide="${esc(r.slide_id)}" data-tile="${r.tile_id}" title="open on its slide">` +
        `<img src="/api/tile/${S.eid}/${r.slide_id}/${r.tile_id}.png?size=96" alt="">#${r.rank} ${esc(r.slide_id)}:${r.tile_id}` +
        `<br>${esc(r.patient_id)} · d = ${fmt(r.distance)}</div>`).join("");
    if (S.slide) drawMarks();
  } catch (e) {
    $("neighbors").innerHTML = `<span class="err">${esc(e.message)}</span>`;
    if (/index/i.test(e.message)) $("buildIndex").hidden = false;
  }
}

// ---- slide viewer (OpenSeadragon) ------------------------------------------------------------------
let viewer = null;
function initViewer() {
  viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "/static/vendor/openseadragon/images/", drawer: "canvas", imageSmoothingEnabled: false,
    showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", crossOriginPolicy: false, maxZoomPixelRatio: 2,
    gestureSettingsMouse: { clickToZoom: false }, animationTime: 0.4,
  });
  S.viewer = viewer;
  viewer.addHandler("open", () => { S.opened = S.slide; drawOverlay(); drawMarks(); if (S.pendingZoom) { zoomToTile(...S.pendingZoom); S.pendingZoom = null; } });
  viewer.addHandler("canvas-click", (e) => {
    if (!e.quick) return;
    const t = tileAt(e.position);
    if (t !== null) queryNeighbours(S.slide, t);
  });
  new OpenSeadragon.MouseTracker({
    element: viewer.element,
    moveHandler: (e) => {
      const t = tileAt(e.position);
      if (t === null) { $("slideHover").textContent = ""; return; }
      let txt = `${S.slide}:${t}`;
      if (S.overlay && S.overlay.slide_id === S.slide) {
        const j = S.overlay.pos.get(t), c = S.overlay.c;
        if (j !== undefined) txt += ` · ${c.v.label}: ` + (c.v.kind === "categorical" ? (c.v.categories[c.idx[j]] ?? "no value") : fmt(c.vals[j])) + (c.v.units ? ` (${c.v.units})` : "");
      }
      $("slideHover").textContent = txt;
    },
  });
}

async function geometry(sid) {
  const key = `${S.tiling}/${sid}`;
  if (!S.geometry[key]) {
    S.geometry[key] = getJSON(`/api/tiles?extraction=${S.eid}&slide=${encodeURIComponent(sid)}`).then((g) => {
      const x = b64(g.x, Float32Array), y = b64(g.y, Float32Array), s = b64(g.size0, Float32Array), id = b64(g.tile_id, Int32Array);
      const pos = new Map(); id.forEach((t, j) => pos.set(t, j));
      return { x, y, s, id, pos };
    });
  }
  return S.geometry[key];
}

function tileAt(pixel) {
  const m = S.slideMeta[S.slide], g = S.geoNow;
  if (!m || !g || !viewer.world.getItemCount()) return null;
  const p = viewer.viewport.viewerElementToImageCoordinates(pixel);
  const X = p.x + m.bounds.x0, Y = p.y + m.bounds.y0;
  for (let j = 0; j < g.id.length; j++) if (X >= g.x[j] && Y >= g.y[j] && X < g.x[j] + g.s[j] && Y < g.y[j] + g.s[j]) return g.id[j];
  return null;
}

async function openSlide(sid, zoomTile = null) {
  if (!sid) return;
  S.slide = sid;
  $("slide").value = sid;
  if (!S.slideMeta[sid]) S.slideMeta[sid] = await getJSON(`/api/slide/${encodeURIComponent(sid)}`);
  S.geoNow = await geometry(sid).catch(() => null);
  S.pendingZoom = zoomTile === null ? null : [sid, zoomTile];
  S.overlayItem = null; S.marksItem = null;
  viewer.open(`/dz/${encodeURIComponent(sid)}.dzi`);
}

function layerCanvas(m) {
  const W = Math.min(2048, m.bounds.width), sc = W / m.bounds.width;
  const cv = document.createElement("canvas");
  cv.width = Math.max(1, Math.round(W)); cv.height = Math.max(1, Math.round(m.bounds.height * sc));
  return [cv, sc];
}
function addLayer(cv, opacity, old) {
  return new Promise((ok) => cv.toBlob((blob) => {
    if (old) viewer.world.removeItem(old);
    viewer.addSimpleImage({ url: URL.createObjectURL(blob), x: 0, y: 0, width: 1, opacity, success: (e) => ok(e.item) });
  }));
}

async function drawOverlay() {
  const spec = $("overlayBy").value, sid = S.slide, gen = S.gen;
  if (!sid || !viewer.world.getItemCount()) return;
  if (!spec) { if (S.overlayItem) viewer.world.removeItem(S.overlayItem); S.overlayItem = null; S.overlay = null; $("slideLegend").innerHTML = ""; return; }
  try {
    const v = await getJSON(`/api/overlay?extraction=${S.eid}&slide=${encodeURIComponent(sid)}&value=${encodeURIComponent(spec)}`);
    if (gen !== S.gen || sid !== S.slide) return;
    const c = colouring(v), g = await geometry(sid), m = S.slideMeta[sid];
    const [cv, sc] = layerCanvas(m), ctx = cv.getContext("2d");
    const tid = b64(v.tile_id, Int32Array);
    for (let j = 0; j < tid.length; j++) {
      const k = g.pos.get(tid[j]);
      if (k === undefined) continue;
      ctx.fillStyle = c.colors[c.idx[j]];
      ctx.fillRect((g.x[k] - m.bounds.x0) * sc, (g.y[k] - m.bounds.y0) * sc, Math.max(1, g.s[k] * sc), Math.max(1, g.s[k] * sc));
    }
    const pos = new Map(); tid.forEach((t, j) => pos.set(t, j));
    S.overlay = { slide_id: sid, c, pos, spec };
    S.overlayItem = await addLayer(cv, parseFloat($("opacity").value), S.overlayItem);
    $("slideLegend").innerHTML = legendHTML(c);
    $("viewer").dataset.overlay = spec;
  } catch (e) { $("slideLegend").innerHTML = `<span class="err">${esc(e.message)}</span>`; }
}

async function drawMarks() {
  const sid = S.slide;
  if (!sid || !viewer.world.getItemCount()) return;
  const m = S.slideMeta[sid], g = await geometry(sid).catch(() => null);
  if (!g) return;
  const marks = [];
  for (const r of S.neighbours) if (r.slide_id === sid) marks.push([r.tile_id, "#ffeb3b"]);
  if (S.query && S.query.slide === sid) marks.push([S.query.tile, "#00e5ff"]);
  for (const t of S.showSelection ? selectionTilesOn(sid) : []) marks.push([t, "#ff1744"]);
  if (S.focus && S.focus[0] === sid) marks.push([S.focus[1], "#ffffff"]);
  const [cv, sc] = layerCanvas(m), ctx = cv.getContext("2d");
  for (const [t, col] of marks) {
    const k = g.pos.get(t);
    if (k === undefined) continue;
    ctx.lineWidth = Math.max(1.5, g.s[k] * sc * 0.12);
    ctx.strokeStyle = col;
    ctx.strokeRect((g.x[k] - m.bounds.x0) * sc, (g.y[k] - m.bounds.y0) * sc, g.s[k] * sc, g.s[k] * sc);
  }
  S.marks = marks;
  const names = { "#ffeb3b": "nearest neighbour", "#00e5ff": "query tile", "#ff1744": "lassoed tile", "#ffffff": "opened tile" };
  const used = [...new Set(marks.map((m) => m[1]))];
  $("marksLegend").innerHTML = used.length ? `<span class="muted">outlines:</span>` + used.map((c) =>
    `<span><span class="sw" style="background:none;border:2px solid ${c};outline:1px solid #333"></span>${names[c]} (${marks.filter((m) => m[1] === c).length})</span>`).join("") : "";
  S.marksItem = await addLayer(cv, 1, S.marksItem);
  $("viewer").dataset.marks = String(marks.length);
}

async function zoomToTile(sid, tile) {
  const m = S.slideMeta[sid], g = await geometry(sid), k = g.pos.get(tile);
  if (k === undefined) return;
  const bw = m.bounds.width, pad = g.s[k] * 2;
  viewer.viewport.fitBounds(new OpenSeadragon.Rect((g.x[k] - m.bounds.x0 - pad) / bw, (g.y[k] - m.bounds.y0 - pad) / bw,
    (g.s[k] + 2 * pad) / bw, (g.s[k] + 2 * pad) / bw));
  S.focus = [sid, tile];
  drawMarks();
}

// ---- extraction switching ---------------------------------------------------------------------------
function fillValueSelect(sel, options, withSql) {
  const groups = {};
  for (const o of options) (groups[o.source] = groups[o.source] || []).push(o);
  sel.innerHTML = `<option value="">— none —</option>` + Object.entries(groups).map(([g, os]) =>
    `<optgroup label="${esc(g)}">` + os.map((o) => `<option value="${esc(o.spec)}">${esc(o.label)}${o.units ? " (" + esc(o.units) + ")" : ""}</option>`).join("") + `</optgroup>`).join("")
    + (withSql ? `<option value="__sql__">SQL…</option>` : "");
}

async function loadExtraction(eid) {
  S.gen++;
  const gen = S.gen;
  Object.assign(S, { eid, color: null, selection: [], neighbours: [], query: null, overlay: null, focus: null, showSelection: false, geometry: {}, tileInfo: new Map() });
  S.tiling = (S.extractions.find((e) => e.extraction_id === eid) || {}).tiling_id;
  $("neighbors").innerHTML = ""; $("queryLabel").textContent = ""; $("legend").innerHTML = ""; $("slideLegend").innerHTML = ""; $("marksLegend").innerHTML = "";
  $("buildIndex").hidden = true; $("hover").hidden = true; $("sqlRow").hidden = true;
  clearSelection();
  const [umaps, opts] = await Promise.all([getJSON(`/api/umaps?extraction=${eid}`), getJSON(`/api/values?extraction=${eid}`)]);
  if (gen !== S.gen) return;
  S.valueOptions = opts;
  $("umap").innerHTML = umaps.map((u) => `<option value="${u.umap_id}">${esc(u.what)}${u.stale ? " — STALE" : ""} (${u.umap_id})</option>`).join("")
    || `<option value="">no map yet</option>`;
  fillValueSelect($("colorBy"), opts, true);
  fillValueSelect($("overlayBy"), opts, false);
  if (S.slide) { S.geoNow = await geometry(S.slide).catch(() => null); drawOverlay(); drawMarks(); }
  if (umaps.length) await loadUmap(umaps[0].umap_id);
  else { await loadUmap(null); status(`no UMAP of ${eid} yet: press "compute UMAP" or run hefeat umap --extraction ${eid}`); }
}

// ---- wiring ------------------------------------------------------------------------------------------
function wire() {
  $("extraction").addEventListener("change", (e) => loadExtraction(e.target.value).catch((x) => status(x.message, true)));
  $("umap").addEventListener("change", (e) => loadUmap(e.target.value).catch((x) => status(x.message, true)));
  $("colorBy").addEventListener("change", (e) => { $("sqlRow").hidden = e.target.value !== "__sql__"; applyColor(e.target.value); });
  $("sqlGo").addEventListener("click", () => applyColor($("sqlInput").value));
  $("overlayBy").addEventListener("change", () => drawOverlay());
  $("opacity").addEventListener("input", (e) => { if (S.overlayItem) S.overlayItem.setOpacity(parseFloat(e.target.value)); });
  $("slide").addEventListener("change", (e) => openSlide(e.target.value));
  $("exclude").addEventListener("change", () => { if (S.query) queryNeighbours(S.query.slide, S.query.tile); });
  $("k").addEventListener("change", () => { if (S.query) queryNeighbours(S.query.slide, S.query.tile); });
  $("resetView").addEventListener("click", () => sp.zoomToOrigin({ transition: true }));
  $("lassoBtn").addEventListener("click", (e) => {
    const on = sp.get("mouseMode") !== "lasso";
    sp.set({ mouseMode: on ? "lasso" : "panZoom" });
    e.target.setAttribute("aria-pressed", String(on));
  });
  $("helpBtn").addEventListener("click", (e) => { $("help").hidden = !$("help").hidden; e.target.setAttribute("aria-expanded", String(!$("help").hidden)); });
  $("computeUmap").addEventListener("click", async () => {
    status("computing UMAP (this can take minutes for large extractions)…");
    try {
      const u = await postJSON("/api/umap", { extraction: S.eid });
      await loadExtraction(S.eid); $("umap").value = u.umap_id; await loadUmap(u.umap_id);
      status(u.cached ? `map ${u.umap_id} was already stored for exactly this data and these settings (cached, not recomputed)`
        : `computed map ${u.umap_id} in ${u.seconds} s`);
    }
    catch (e) { status(e.message, true); }
  });
  $("buildIndex").addEventListener("click", async () => {
    $("neighbors").innerHTML = "building index…";
    try { await postJSON("/api/index", { extraction: S.eid }); if (S.query) queryNeighbours(S.query.slide, S.query.tile); }
    catch (e) { $("neighbors").innerHTML = `<span class="err">${esc(e.message)}</span>`; }
  });
  $("neighbors").addEventListener("click", (e) => {
    const d = e.target.closest(".nb");
    if (d) openSlide(d.dataset.slide, parseInt(d.dataset.tile, 10));
  });
  $("selection").addEventListener("click", (e) => {
    const d = e.target.closest(".sel");
    if (d) openSlide(d.dataset.slide, parseInt(d.dataset.tile, 10));
  });
  $("selSlides").addEventListener("click", (e) => { if (e.target.dataset.slide) { S.showSelection = true; openSlide(e.target.dataset.slide); } });
  $("showOnSlides").addEventListener("click", () => { S.showSelection = true; if (S.selectionBySlide && S.selectionBySlide.length) openSlide(S.selectionBySlide[0][0]); });
}

(async () => {
  wire();
  try {
    initViewer();
    await initScatter();
    const [ex, sl] = await Promise.all([getJSON("/api/extractions"), getJSON("/api/slides")]);
    S.extractions = ex;
    $("extraction").innerHTML = ex.map((e) => `<option value="${e.extraction_id}">${e.extraction_id} (${esc(e.encoder)}${e.layer ? " " + esc(e.layer) : ""}, ${e.dim}-d, ${e.tiles ?? 0} tiles)</option>`).join("");
    $("slide").innerHTML = sl.map((s) => `<option value="${esc(s.slide_id)}">${esc(s.slide_id)} (${esc(s.patient_id)}, ${esc(s.site)})</option>`).join("");
    if (ex.length) await loadExtraction(ex[0].extraction_id);
    if (sl.length) await openSlide(sl[0].slide_id);
    document.body.dataset.ready = String(Math.round(performance.now() - t0));
  } catch (e) { status(e.message, true); }
})();
