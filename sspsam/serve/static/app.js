// sspsam web page: send an image and phrases (or classes) to the API and draw the masks it returns.
// Masks arrive as COCO RLE with pycocotools' compressed string counts; decodeRle turns them into
// row-major 0/1 arrays here, so the page draws exactly what the API returned.
// Never stale: a new upload, a new request and an error each clear the previous result (masks,
// legend, warnings, downloads), and a response that arrives after a newer upload or request is
// dropped, so the page never shows one image's mask over another.
// For tests: window.__lastResult holds the last response and its decoded masks (null when cleared),
// and <body data-state> is idle | loading | done | error.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, bitmap: null, result: null, masks: [], mode: "segment", examples: {}, seq: 0 };

// ---- COCO RLE ------------------------------------------------------------------------------

// pycocotools' rleFrString: 5 bits per character (offset 48), bit 0x20 = more characters follow,
// bit 0x10 of the last one = negative; from the third count on, counts are deltas to the one two back.
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p++; k++;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// RLE runs alternate 0s and 1s (starting with 0s) down the columns (Fortran order).
function decodeRle(rle) {
  const [h, w] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  const out = new Uint8Array(h * w);
  let idx = 0, one = false;
  for (const n of counts) {
    if (one) for (let i = idx; i < idx + n; i++) out[(i % h) * w + Math.floor(i / h)] = 1;
    idx += n;
    one = !one;
  }
  return out;
}

// the same colours as sspsam.io.masks.palette (golden-ratio hues), so page and PNG overlays agree
function palette(n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const h = (0.02 + i * 0.618034) % 1.0, s = 0.85, v = 1.0;
    const j = Math.floor(h * 6), f = h * 6 - j;
    const p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
    const rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][j % 6];
    out.push(rgb.map((c) => Math.floor(c * 255)));
  }
  return out;
}

// ---- input -----------------------------------------------------------------------------------

function setStatus(text, kind) {
  $("status").textContent = text;
  document.body.dataset.state = kind;
}

function showError(text) {
  clearResult();
  $("error").textContent = text;
  $("error").hidden = false;
  setStatus("", "error");
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

// the previous answer goes: masks, legend, warnings, downloads
function clearResult() {
  state.result = null;
  state.masks = [];
  window.__lastResult = null;
  showWarnings([]);
  renderLegend();
  drawOverlay();
  $("dl-mask").disabled = $("dl-json").disabled = true;
}

function showWarnings(list) {
  const box = $("warnings");
  box.replaceChildren(...list.map((w) => {
    const p = document.createElement("p");
    p.textContent = `⚠ ${w}`;
    return p;
  }));
  box.hidden = !list.length;
}

async function takeFile(file) {
  if (!file) return;
  const seq = ++state.seq;  // a request still running for the previous image is now stale
  state.file = file;
  $("filename").textContent = `${file.name} (${Math.round(file.size / 1024)} KB)`;
  clearError();
  clearResult();
  $("run").disabled = false;
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (e) {
    bitmap = null;  // the browser cannot show it; the server may still read it (e.g. TIFF)
  }
  if (seq !== state.seq) return;  // another file was chosen meanwhile
  state.bitmap = bitmap;
  if (bitmap) drawImage(bitmap.height, bitmap.width);
  else drawImage(0, 0);  // never leave the previous image on show
  $("no-preview").hidden = !!bitmap;
  setStatus("Image ready: type what to find.", "idle");
}

// fit the picture to the view: small scenes are scaled up (with crisp pixels), large photos down
function fitStage(h, w) {
  const stage = $("stage");
  const avail = Math.max(200, $("view").clientWidth);
  const tall = Math.max(200, window.innerHeight - 120);
  const scale = h && w ? Math.min(avail / w, tall / h) : 1;
  for (const c of [$("image"), $("overlay"), $("boxes")]) {
    c.style.width = `${Math.floor(w * scale)}px`;
    c.style.height = `${Math.floor(h * scale)}px`;
  }
  stage.classList.toggle("pixelated", scale >= 2);
}

function drawImage(h, w) {
  for (const c of [$("image"), $("overlay"), $("boxes")]) { c.width = w; c.height = h; }
  fitStage(h, w);
  const ctx = $("image").getContext("2d");
  ctx.clearRect(0, 0, w, h);
  if (state.bitmap && w && h) ctx.drawImage(state.bitmap, 0, 0, w, h);
}

function texts() {
  const raw = $("text").value;
  if (state.mode === "ovss") return [raw];
  const parts = raw.split(";").map((t) => t.trim()).filter(Boolean);
  return parts.length ? parts : [raw];  // an empty phrase goes through so the server's message is shown
}

async function run(event) {
  event.preventDefault();
  clearError();
  clearResult();
  if (!state.file) { showError("Choose or drop an image first."); return; }
  const mode = state.mode, sent = texts(), seq = ++state.seq;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const t of sent) form.append(mode === "ovss" ? "classes" : "phrases", t);
  setStatus("Segmenting…", "loading");
  $("run").disabled = true;
  try {
    const resp = await fetch(mode === "ovss" ? "/v1/ovss" : "/v1/segment", { method: "POST", body: form });
    const body = await resp.json().catch(() => ({ error: { message: `HTTP ${resp.status}` } }));
    if (seq !== state.seq) return;  // a newer upload or request owns the page now
    if (!resp.ok) {
      showError(`Error ${resp.status}: ${body.error ? body.error.message : resp.statusText}`);
      return;
    }
    show(mode, sent, body);
  } catch (e) {
    if (seq === state.seq) showError(`Request failed: ${e}`);
  } finally {
    if (seq === state.seq) $("run").disabled = false;
  }
}

// ---- output ----------------------------------------------------------------------------------

function show(mode, sent, body) {
  const [h, w] = body.image_size;
  // OVSS: the server's class colours (the overlay's and the label PNG's: "blue" is blue)
  const items = mode === "ovss"
    ? body.masks.map((m) => ({ label: m.class, score: m.share, kind: "share", rle: m.rle, empty: false,
                               colour: body.colours ? body.colours[m.index] : null }))
    : body.results.map((r) => ({ label: r.phrase, score: r.score, kind: "score", rle: r.rle, empty: r.no_target,
                                 instances: Array.isArray(r.instances) ? r.instances : [] }));
  const colours = palette(items.length);
  state.result = body;
  state.masks = items.map((m, i) => {
    const data = decodeRle(m.rle);
    // never "found" without pixels: an empty mask counts as no match whatever the flags say
    return { ...m, colour: m.colour || colours[i], visible: true, data, empty: m.empty || !data.includes(1) };
  });
  drawImage(h, w);
  renderLegend();
  drawOverlay();
  showWarnings(Array.isArray(body.warnings) ? body.warnings : []);
  const found = state.masks.filter((m) => !m.empty).length;
  setStatus(mode === "ovss" ? `${found} classes present.` : `${found} of ${items.length} phrases found.`, "done");
  $("dl-mask").disabled = $("dl-json").disabled = !found;
  window.__lastResult = { mode, texts: sent, response: body, width: w, height: h, masks: state.masks };
}

function renderLegend() {
  const ul = $("legend");
  ul.replaceChildren();
  state.masks.forEach((m, i) => {
    const li = document.createElement("li");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = m.visible && !m.empty;
    box.disabled = m.empty;  // nothing to show or hide
    box.dataset.index = i;
    box.id = `show-${i}`;
    box.addEventListener("change", () => { m.visible = box.checked; drawOverlay(); });
    const sw = document.createElement("span");
    sw.className = m.empty ? "swatch none" : "swatch";
    if (!m.empty) sw.style.background = `rgb(${m.colour.join(",")})`;
    const name = document.createElement("label");
    name.htmlFor = box.id;
    name.textContent = m.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = m.empty ? "no match" : describe(m);
    li.append(box, sw, name, score);
    // phrases: each separate object found, with its box (x0,y0–x1,y1 in image pixels) and score
    if (!m.empty && m.instances && m.instances.length) {
      const sub = document.createElement("ol");
      sub.className = "instances";
      for (const inst of m.instances) {
        const it = document.createElement("li");
        const [x0, y0, x1, y1] = inst.bbox_xyxy.map((v) => Math.round(v));
        it.textContent = `box ${x0},${y0}–${x1},${y1} · ${inst.score.toFixed(3)}`;
        sub.append(it);
      }
      li.append(sub);
    }
    ul.append(li);
  });
  if (!state.masks.length) $("dl-mask").disabled = $("dl-json").disabled = true;
}

function describe(m) {
  return m.kind === "share" ? `${(m.score * 100).toFixed(1)}%` : m.score.toFixed(3);
}

function drawOverlay() {
  const canvas = $("overlay"), w = canvas.width, h = canvas.height;
  const ctx = canvas.getContext("2d"), boxCanvas = $("boxes"), bctx = boxCanvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  bctx.clearRect(0, 0, boxCanvas.width, boxCanvas.height);
  const visible = state.masks.filter((m) => m.visible && !m.empty);
  canvas.dataset.masks = visible.length;
  boxCanvas.dataset.boxes = 0;
  if (!visible.length || !w || !h) return;
  const img = ctx.createImageData(w, h), px = img.data;
  // a translucent fill, and an opaque border band ~1/400 of the long side wide (at least 1 px) so the
  // mask's extent reads on any image; both only on the mask's own pixels
  const band = Math.max(1, Math.round(Math.max(w, h) / 400));
  for (const m of visible) {
    const [r, g, b] = m.colour, d = m.data;
    for (let i = 0; i < d.length; i++) {
      if (!d[i]) continue;
      const x = i % w, y = (i - x) / w;
      let edge = false;
      for (let k = 1; k <= band && !edge; k++) {
        edge = x < k || y < k || x + k >= w || y + k >= h || !d[i - k] || !d[i + k] || !d[i - k * w] || !d[i + k * w];
      }
      px[4 * i] = r; px[4 * i + 1] = g; px[4 * i + 2] = b; px[4 * i + 3] = edge ? 255 : 115;
    }
  }
  ctx.putImageData(img, 0, 0);
  // each instance's box, in its phrase's colour, numbered as in the legend's list; on a canvas of
  // its own above the masks, so the mask layer stays exactly the API's masks
  bctx.lineWidth = band;
  bctx.font = `${Math.max(10, 6 * band)}px sans-serif`;
  let boxes = 0;
  for (const m of visible) {
    (m.instances || []).forEach((inst, k) => {
      const [x0, y0, x1, y1] = inst.bbox_xyxy;
      bctx.strokeStyle = bctx.fillStyle = `rgb(${m.colour.join(",")})`;
      bctx.strokeRect(x0 + band / 2, y0 + band / 2, Math.max(0, x1 - x0 - band), Math.max(0, y1 - y0 - band));
      if (m.instances.length > 1) bctx.fillText(String(k + 1), x0 + 2 * band, y0 + 7 * band + 4);
      boxes++;
    });
  }
  boxCanvas.dataset.boxes = boxes;
}

function hover(event) {
  const canvas = $("overlay"), rect = canvas.getBoundingClientRect(), tip = $("tip");
  const x = Math.floor((event.clientX - rect.left) * canvas.width / rect.width);
  const y = Math.floor((event.clientY - rect.top) * canvas.height / rect.height);
  const hit = [...state.masks].reverse().find((m) => m.visible && !m.empty && m.data[y * canvas.width + x]);
  if (!hit) { tip.hidden = true; return; }
  tip.textContent = `${hit.label} — ${hit.kind} ${describe(hit)}`;
  tip.style.left = `${event.clientX - rect.left + 12}px`;
  tip.style.top = `${event.clientY - rect.top + 12}px`;
  tip.hidden = false;
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function stem() {
  return state.file ? state.file.name.replace(/\.[^.]*$/, "") : "image";
}

// classes: the server's label PNG (palette PNG: pixel = class index, shown in the overlay's colours);
// phrases: one visible mask white on black (a binary mask), several each in its colour on black
function downloadMask() {
  if (state.result.label_png) {
    const bytes = Uint8Array.from(atob(state.result.label_png), (c) => c.charCodeAt(0));
    download(new Blob([bytes], { type: "image/png" }), `${stem()}.ovss.labels.png`);
    return;
  }
  const [h, w] = state.result.image_size;
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d"), img = ctx.createImageData(w, h), px = img.data;
  const visible = state.masks.filter((m) => m.visible && !m.empty);
  for (let i = 0; i < w * h; i++) px[4 * i + 3] = 255;
  for (const m of visible) {
    const colour = visible.length === 1 ? [255, 255, 255] : m.colour;
    for (let i = 0; i < m.data.length; i++) {
      if (m.data[i]) { px[4 * i] = colour[0]; px[4 * i + 1] = colour[1]; px[4 * i + 2] = colour[2]; }
    }
  }
  ctx.putImageData(img, 0, 0);
  c.toBlob((blob) => download(blob, `${stem()}.segment.mask.png`), "image/png");
}

function downloadJson() {
  const { overlay_png, label_png, ...rest } = state.result;  // the masks are in the RLE; keep the file small
  download(new Blob([JSON.stringify(rest, null, 1)], { type: "application/json" }), `${stem()}.json`);
}

// ---- wiring ----------------------------------------------------------------------------------

function setMode(mode) {
  if (mode !== state.mode) { clearError(); clearResult(); setStatus("", "idle"); }
  state.mode = mode;
  $("run").textContent = mode === "ovss" ? "Label" : "Segment";
  $("text-label").textContent = mode === "ovss" ? "Class names" : "Phrases";
  $("hint").textContent = mode === "ovss" ? "Class names, comma-separated." : "Several phrases: separate them with “;”.";
  $("dl-mask").textContent = mode === "ovss" ? "Download label PNG" : "Download mask PNG";
  renderExamples();
}

// examples the loaded model knows (its checkpoint's example_phrases / example_classes)
function renderExamples() {
  const list = state.examples[state.mode] || [];
  const ovss = state.mode === "ovss";
  $("text").placeholder = list.length ? (ovss ? list.join(", ") : list[0])
    : (ovss ? "sky, road, car, person" : "the man holding the umbrella");
  const box = $("examples");
  const chips = ovss && list.length ? [list.join(", ")] : list;
  box.replaceChildren(...chips.map((text) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.title = "Use this example";
    b.addEventListener("click", () => { $("text").value = text; $("text").focus(); });
    return b;
  }));
  if (chips.length) box.prepend(Object.assign(document.createElement("span"), { className: "hint", textContent: "Try: " }));
}

async function loadModels() {
  try {
    const info = await (await fetch("/v1/models")).json();
    $("model").textContent = `model ${info.segment.name}` + (info.ovss ? `, classes ${info.ovss.name}` : "");
    state.examples = { segment: info.segment.examples || [], ovss: (info.ovss && info.ovss.examples) || [] };
    renderExamples();
    if (!info.ovss) {
      const radio = document.querySelector('input[name="mode"][value="ovss"]');
      radio.disabled = true;
      radio.parentElement.title = "this server runs without an OVSS model";
    }
  } catch (e) {
    $("model").textContent = "(cannot reach the API)";
  }
}

$("file").addEventListener("change", (e) => takeFile(e.target.files[0]));
const drop = $("drop");
// keyboard upload: the drop zone is a button; Enter or Space opens the file dialog
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
});
drop.addEventListener("click", (e) => { if (!e.target.closest("label, input")) $("file").click(); });
window.addEventListener("resize", () => fitStage($("image").height, $("image").width));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); takeFile(e.dataTransfer.files[0]); });
document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", () => setMode(r.value)));
$("query").addEventListener("submit", run);
$("overlay").addEventListener("mousemove", hover);
$("overlay").addEventListener("mouseleave", () => { $("tip").hidden = true; });
$("dl-mask").addEventListener("click", downloadMask);
$("dl-json").addEventListener("click", downloadJson);
loadModels();
