// The page: pick images, send them with the settings, follow the job, show degraded | restored.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { status: null, inputs: [], job: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function message(text, kind = "error") {
  $("messages").append(el("div", { class: kind, text }));
}

function clearMessages() { $("messages").replaceChildren(); }

const mib = (bytes) => (bytes / 1048576).toFixed(1) + " MiB";

// ---------------------------------------------------------------- server status
async function refreshStatus() {
  let s;
  try {
    const r = await fetch("/api/status");
    s = await r.json();
  } catch (e) {
    const pill = $("server-status");
    pill.textContent = "server not reachable";
    pill.className = "pill down";
    return;
  }
  const first = state.status === null;
  state.status = s;
  if (first) setupControls(s);
  const pill = $("server-status");
  const b = s.batching;
  if (s.state === "ready") {
    pill.textContent = b.status ? b.status : "ready";
    pill.className = "pill ready";
  } else {
    pill.textContent = b.status || s.state;
    pill.className = s.state === "stopped" ? "pill down" : "pill warming";
  }
  const rss = s.memory.rss_bytes ? ` · server memory ${mib(s.memory.rss_bytes)}` : "";
  $("stats").textContent = `${b.images} images restored in ${b.calls} calls (batch sizes ${b.batch_sizes.join(", ")}, ` +
    `${b.batch_mode}) · ${b.compiles} programs compiled (${b.cache_hits} from cache) · ` +
    `${b.waiting} waiting${rss}`;
  updateRestoreButton();
}

function fillSelect(select, values, value) {
  select.replaceChildren(...values.map((v) => el("option", { value: String(v), text: String(v) })));
  select.value = String(value);
}

function setupControls(s) {
  const m = s.model;
  $("model").textContent = `${m.checkpoint.split("/").slice(-2).join("/")} · native ${m.image_size}px · ` +
    `${m.platform} x${m.devices}`;
  fillSelect($("photo"), s.choices.photo, s.choices.photo[0]);
  fillSelect($("degradation"), s.choices.degradation, "noise");
  const f = $("settings").elements;
  const d = s.defaults;
  f.steps.value = d.steps; f.steps.max = s.limits.max_steps;
  fillSelect(f.sampler, s.choices.sampler, d.sampler);
  f.seed.value = d.seed;
  f.fidelity.value = d.fidelity; f.fidelity.max = s.limits.max_fidelity;
  fillSelect(f.color_fix, s.choices.color_fix, d.color_fix);
  f.samples.value = d.samples; f.samples.max = s.limits.max_samples;
  const tiles = ["auto", "0"].concat(s.choices.tile.map(String));
  fillSelect(f.tile, tiles, String(d.tile));
  f.tile.querySelector('option[value="0"]').textContent = "0 (never)";
}

function updateRestoreButton() {
  $("restore").disabled = state.inputs.length === 0 || state.status === null || state.status.state === "stopped";
}

// ---------------------------------------------------------------- inputs
function addInput(blob, name) {
  const s = state.status;
  if (s && state.inputs.length >= s.limits.max_images) {
    message(`${name}: at most ${s.limits.max_images} images per request`);
    return;
  }
  const url = URL.createObjectURL(blob);
  const item = { blob, name, url };
  state.inputs.push(item);
  const remove = el("button", { type: "button", title: "remove", text: "×" });
  const li = el("li", { "data-name": name }, el("img", { src: url, alt: name }), el("span", { text: name }), remove);
  remove.addEventListener("click", () => {
    state.inputs = state.inputs.filter((x) => x !== item);
    URL.revokeObjectURL(url);
    li.remove();
    updateRestoreButton();
  });
  $("inputs").append(li);
  updateRestoreButton();
}

function addFiles(files) {
  for (const file of files) addInput(file, file.name);
}

$("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
$("deg-strength").addEventListener("input", (e) => { $("deg-strength-value").textContent = e.target.value; });

$("add-sample").addEventListener("click", async () => {
  clearMessages();
  const photo = $("photo").value, type = $("degradation").value;
  const strength = $("deg-strength").value, seed = $("deg-seed").value || "0";
  const q = new URLSearchParams({ photo, type, strength, seed });
  const button = $("add-sample");
  button.disabled = true;
  button.textContent = "Degrading…";
  try {
    const r = await fetch("/api/sample.png?" + q);
    if (!r.ok) { message((await r.json()).error); return; }
    addInput(await r.blob(), `${photo}_${type}_${strength}_seed${seed}.png`);
  } catch (e) {
    message("could not reach the server: " + e);
  } finally {
    button.disabled = false;
    button.textContent = "Add";
  }
});

// ---------------------------------------------------------------- restore
$("restore").addEventListener("click", async () => {
  clearMessages();
  const s = state.status;
  const total = state.inputs.reduce((n, x) => n + x.blob.size, 0);
  if (s && total > s.limits.max_upload_bytes) {
    message(`these images add up to ${mib(total)}; the server accepts at most ${mib(s.limits.max_upload_bytes)} ` +
      "per request: send fewer at a time");
    return;
  }
  const form = new FormData();
  for (const x of state.inputs) form.append("image", x.blob, x.name);
  for (const [k, v] of new FormData($("settings"))) form.append(k, v);
  $("restore").disabled = true;
  let r, body;
  try {
    r = await fetch("/api/restore", { method: "POST", body: form });
    body = await r.json();
  } catch (e) {
    message("the upload failed: " + e);
    updateRestoreButton();
    return;
  }
  updateRestoreButton();
  if (!r.ok) {
    message(body.error || `the server answered ${r.status}`);
    for (const f of body.files || []) message(`${f.name}: ${f.error}`);
    return;
  }
  for (const f of body.files || []) message(`${f.name}: ${f.error}`);
  followJob(body.job);
});

async function followJob(id) {
  state.job = id;
  const results = $("results");
  results.replaceChildren();
  $("download-all").hidden = true;
  $("progress").hidden = false;
  const cards = new Map();
  let version = -1;
  while (state.job === id) {
    let snap;
    try {
      const r = await fetch(`/api/jobs/${id}?version=${version}&wait=10`);
      snap = await r.json();
      if (!r.ok) { message(snap.error); break; }
    } catch (e) {
      message("lost the connection to the server: " + e);
      break;
    }
    version = snap.version;
    showProgress(snap);
    for (const img of snap.images) {
      let card = cards.get(img.index);
      if (!card) { card = makeCard(img); cards.set(img.index, card); results.append(card.node); }
      updateCard(card, img);
    }
    if (snap.zip_url) {
      const a = $("download-all");
      a.href = snap.zip_url;
      a.setAttribute("download", `restored_${id}.zip`);
      a.hidden = false;
    }
    if (snap.finished) break;
  }
}

function showProgress(snap) {
  $("progress-bar").max = snap.total;
  $("progress-bar").value = snap.done + snap.failed;
  const waiting = snap.images.filter((x) => x.state === "queued");
  const running = snap.images.filter((x) => x.state === "running");
  let text = `${snap.done} of ${snap.total} restored`;
  if (snap.failed) text += `, ${snap.failed} failed`;
  if (running.length) {
    const c = running[0].call;
    text += ` · restoring ${running.length} in a call of ${c.rows}` + (c.compiling ? " (compiling its program first)" : "");
  }
  if (waiting.length) {
    const ahead = Math.min(...waiting.map((x) => x.ahead ?? 0));
    text += ` · ${waiting.length} waiting` + (ahead ? ` behind ${ahead} other image(s)` : "");
    if (waiting.some((x) => x.needs_compile)) text += " · a new size or setting: its program compiles first";
  }
  if (snap.finished) text = `${snap.done} of ${snap.total} restored` + (snap.failed ? `, ${snap.failed} failed` : "");
  $("progress-text").textContent = text;
}

function makeCard(img) {
  const node = el("div", { class: "card", "data-index": String(img.index), "data-name": img.name });
  const head = el("div", { class: "card-head" }, el("b", { text: img.name }));
  const dims = el("span", { class: "dims muted" });
  const stateText = el("span", { class: "state" });
  head.append(dims, stateText);
  const viewer = el("div", { class: "viewer" });
  const side = el("div", { class: "side-info" });
  node.append(head, viewer, side);
  return { node, dims, stateText, viewer, side, shown: false };
}

function updateCard(card, img) {
  if (img.width) card.dims.textContent = `${img.width}×${img.height}`;
  if (img.state === "error") {
    card.node.classList.add("failed");
    card.stateText.replaceChildren(el("span", { class: "error", text: img.error }));
    return;
  }
  if (img.state !== "done") {
    card.stateText.textContent = img.state === "running" ? "restoring…" :
      (img.ahead ? `waiting (${img.ahead} ahead)` : "waiting");
    return;
  }
  card.stateText.textContent = `restored · predicted ${img.predicted_type.replace("_", " ")}` +
    (img.color_fix_applied ? " · colour fixed" : "") + ` · call ${img.call.call} (${img.call.rows} image(s))`;
  if (card.shown) return;
  card.shown = true;
  card.viewer.append(compareWidget(img));
  card.side.append(el("h3", { text: "degradation type (classifier)" }), typeChart(img.type_probs, img.predicted_type));
  const stem = img.name.replace(/\.[^.]*$/, "");
  card.side.append(el("div", { class: "links" },
    el("a", { href: img.restored_url, download: `${stem}_restored.png`, class: "download-png", text: "restored PNG" }),
    el("a", { href: img.sidecar_url, download: `${stem}_restored.json`, class: "download-json", text: "settings (JSON)" })));
}

function compareWidget(img) {
  const wrap = el("div");
  const box = el("div", { class: "compare" });
  const lq = el("img", { class: "degraded", src: img.input_url, alt: `${img.name} degraded` });
  const out = el("img", { class: "restored", src: img.restored_url, alt: `${img.name} restored` });
  const divider = el("div", { class: "divider" });
  box.append(lq, out, divider, el("span", { class: "tag left", text: "degraded" }),
    el("span", { class: "tag right", text: "restored" }));
  const slider = el("input", { type: "range", class: "slider", min: "0", max: "100", value: "50", "aria-label": "compare" });
  const zoom = el("select", { class: "zoom", "aria-label": "zoom" });
  fillSelect(zoom, ["fit", "1", "2", "4", "8"], "fit");
  for (const o of zoom.options) if (o.value !== "fit") o.textContent = o.value + "×";
  const sideBox = el("input", { type: "checkbox", class: "side-by-side" });
  const controls = el("div", { class: "viewer-controls" },
    el("label", {}, "degraded ", slider, " restored"),
    el("label", {}, "zoom ", zoom),
    el("label", {}, sideBox, " side by side"));
  const setSplit = () => {
    const p = slider.value;
    out.style.clipPath = `inset(0 0 0 ${p}%)`;
    divider.style.left = `calc(${p}% - 1px)`;
  };
  const setZoom = () => {
    const fit = Math.min(8, 320 / Math.max(img.width, img.height));
    const z = zoom.value === "fit" ? fit : Number(zoom.value);
    for (const im of [lq, out]) { im.style.width = `${img.width * z}px`; im.style.height = `${img.height * z}px`; }
    box.classList.toggle("pixelated", z >= 2);
  };
  slider.addEventListener("input", setSplit);
  zoom.addEventListener("change", setZoom);
  sideBox.addEventListener("change", () => { box.classList.toggle("side", sideBox.checked); slider.disabled = sideBox.checked; });
  setSplit();
  setZoom();
  wrap.append(box, controls);
  return wrap;
}

function typeChart(probs, predicted) {
  const names = Object.keys(probs);
  const rowH = 20, labelW = 82, barW = 150, width = labelW + barW + 44;
  const chart = svg("svg", { class: "type-chart", width: String(width), height: String(names.length * rowH),
    role: "img", "aria-label": "predicted degradation type probabilities" });
  names.forEach((name, i) => {
    const p = probs[name], y = i * rowH;
    const label = svg("text", { x: "0", y: String(y + 14) });
    label.textContent = name.replace("_", " ");
    const bar = svg("rect", { class: "bar" + (name === predicted ? " top" : ""), x: String(labelW), y: String(y + 4),
      width: String(Math.max(1, p * barW)), height: String(rowH - 8), "data-type": name, "data-prob": String(p) });
    const pct = svg("text", { x: String(labelW + barW + 4), y: String(y + 14) });
    pct.textContent = (100 * p).toFixed(1) + "%";
    chart.append(label, bar, pct);
  });
  return chart;
}

refreshStatus();
setInterval(refreshStatus, 2000);
