"use strict";
// The demo page: talks only to the server that served it (see cdam_pl/app.py for the routes).

const $ = (id) => document.getElementById(id);
const state = { info: null, image: null, target: null, variant: "vanilla", seq: 0 };

async function api(url, options) {
  let res;
  try {
    res = await fetch(url, options);
  } catch (e) {
    throw new Error("the demo server does not answer; is it still running?");
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.error) || `the server answered ${res.status} ${res.statusText}`);
  return body;
}

function showMessage(text) { const m = $("message"); m.textContent = text; m.hidden = false; }
function clearMessage() { const m = $("message"); m.textContent = ""; m.hidden = true; }
function setStatus(text) { $("status").textContent = text; }
function busy(on) { document.body.classList.toggle("busy", on); document.body.dataset.state = on ? "busy" : "idle"; }
const pct = (p) => `${(100 * p).toFixed(1)} %`;
const mb = (n) => `${(n / 2 ** 20).toFixed(1)} MB`;

function loadImg(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve();
    img.onerror = () => reject(new Error("an image failed to load from the server"));
    img.src = src;
  });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "dataset") Object.assign(node.dataset, v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function init() {
  busy(true);
  try {
    const info = await api("/api/info");
    state.info = info;
    const m = info.model;
    $("model").textContent = `${m.backbone} (${m.weights || "random weights"}), ${m.img_size.join("x")} px, ` +
      `${m.head || "linear"} head, ${info.classes.length} classes`;
    for (const ex of info.examples) {
      const b = el("button", { type: "button", title: ex.name, "aria-label": ex.name, dataset: { example: ex.id } },
        el("img", { src: `/api/example.png?id=${encodeURIComponent(ex.id)}`, alt: ex.name }));
      b.addEventListener("click", () => pickExample(ex.id));
      $("examples").append(b);
    }
    if (!info.examples.length) $("examples").append(el("span", { class: "hint" }, "(none available)"));
    for (const v of info.variants) {
      const input = el("input", { type: "radio", name: "variant", value: v.id, id: `variant-${v.id}` });
      input.checked = v.id === state.variant;
      input.addEventListener("change", () => { state.variant = v.id; if (state.target) show(state.target); });
      $("variants").append(el("label", { for: `variant-${v.id}` }, input, ` ${v.label}`));
    }
    const select = $("class-select");
    info.classes.forEach((name, i) => select.append(el("option", { value: `c${i}` }, name)));
    select.addEventListener("change", () => { if (select.value) show(select.value); });
    for (const c of info.concepts) addConceptButton(c);
    setStatus("upload an image or pick an example");
  } catch (e) {
    showMessage(e.message);
  } finally {
    busy(false);
  }
}

async function uploadFile(file) {
  clearMessage();
  const limit = state.info ? state.info.limits.max_upload_bytes : Infinity;
  if (file.size === 0) return showMessage(`'${file.name}' is empty (0 bytes); choose an image file`);
  if (file.size > limit) {
    return showMessage(`'${file.name}' is ${mb(file.size)}, more than the limit of ${mb(limit)}; choose a smaller image`);
  }
  busy(true);
  setStatus(`explaining ${file.name}…`);
  try {
    setImage(await api(`/api/upload?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file }));
  } catch (e) {
    setStatus("");
    showMessage(e.message);
  } finally {
    busy(false);
  }
}

async function pickExample(id) {
  clearMessage();
  busy(true);
  setStatus("explaining the example…");
  try {
    setImage(await api(`/api/example?id=${encodeURIComponent(id)}`, { method: "POST" }));
  } catch (e) {
    setStatus("");
    showMessage(e.message);
  } finally {
    busy(false);
  }
}

async function setImage(summary) {
  state.image = summary;
  state.target = null;
  $("input-caption").textContent = `${summary.name} (model input ${summary.input_size.join("x")}, ` +
    `${summary.grid.join("x")} tokens)`;
  const list = $("predictions");
  list.replaceChildren();
  for (const t of summary.top) {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${(100 * t.prob).toFixed(1)}%`;  // CSSOM, not a style attribute (the page's CSP forbids those)
    const b = el("button", { type: "button", dataset: { target: t.target, prob: String(t.prob) } },
      bar, el("span", { class: "name" }, t.name), el("span", { class: "prob" }, pct(t.prob)));
    b.addEventListener("click", () => show(t.target));
    list.append(el("li", {}, b));
  }
  $("class-select").disabled = false;
  const every = summary.classes_explained === 1 ? "its class" : `all ${summary.classes_explained} classes`;
  const took = summary.cached ? `from the cache (${every})`
    : `${every} explained in ${(1000 * summary.seconds).toFixed(0)} ms`;
  setStatus(`${summary.name}: ${took}`);
  await loadImg($("input-img"), `/api/input.png?image=${summary.id}`).catch((e) => showMessage(e.message));
  if (summary.top.length) await show(summary.top[0].target);
}

function markSelected(target) {
  document.querySelectorAll("button[data-target]").forEach((b) => b.classList.toggle("selected", b.dataset.target === target));
  const select = $("class-select");
  select.value = target.startsWith("c") ? target : "";
}

async function show(target) {
  if (!state.image) return showMessage("upload or pick an image first");
  const seq = ++state.seq;
  const variant = state.variant;
  state.target = target;
  markSelected(target);
  clearMessage();
  busy(true);
  setStatus(variant === "vanilla" ? "rendering…" : `computing ${variant} CDAM…`);
  try {
    const r = await api(`/api/explain?image=${state.image.id}&target=${encodeURIComponent(target)}&variant=${variant}`);
    if (seq !== state.seq) return;
    await Promise.all([loadImg($("overlay"), r.overlay), loadImg($("attention"), r.attention)]);
    if (seq !== state.seq) return;
    $("overlay").dataset.loaded = `${variant}:${target}`;
    $("overlay").alt = r.title;
    const score = r.kind === "class" ? `p = ${pct(r.prob)}, logit ${r.logit.toFixed(3)}`
      : `similarity ${r.similarity.toFixed(3)}`;
    $("overlay-caption").textContent = `${r.title} (${score})`;
    $("range").textContent = `colour range ±${r.vmax.toPrecision(3)}`;
    $("dl-panel").href = r.panel;
    $("dl-raw").href = r.raw;
    $("downloads").hidden = false;
    setStatus(r.computed ? `${r.title}: computed in ${(1000 * r.seconds).toFixed(0)} ms`
      : `${r.title}: from this image's cached maps`);
  } catch (e) {
    if (seq === state.seq) { setStatus(""); showMessage(e.message); }
  } finally {
    if (seq === state.seq) busy(false);
  }
}

function addConceptButton(c) {
  const b = el("button", { type: "button", dataset: { target: c.target }, title: `${c.n_images} example image(s)` },
    c.name);
  b.addEventListener("click", () => show(c.target));
  $("concepts").append(b);
}

async function addConcept(event) {
  event.preventDefault();
  clearMessage();
  const files = Array.from($("concept-files").files);
  const max = state.info ? state.info.limits.max_concept_images : 5;
  if (files.length < 1 || files.length > max) return showMessage(`choose 1 to ${max} example images for the concept`);
  const limit = state.info ? state.info.limits.max_upload_bytes : Infinity;
  const big = files.find((f) => f.size > limit);
  if (big) return showMessage(`concept example '${big.name}' is ${mb(big.size)}, more than the limit of ${mb(limit)}`);
  const form = new FormData();
  form.append("name", $("concept-name").value);
  for (const f of files) form.append("images", f, f.name);
  busy(true);
  setStatus("computing the concept vector…");
  try {
    const c = await api("/api/concept", { method: "POST", body: form });
    addConceptButton(c);
    $("concept-form").reset();
    $("concept-count").textContent = "";
    setStatus(`concept '${c.name}' added (${c.n_images} image${c.n_images === 1 ? "" : "s"})`);
    if (state.image) await show(c.target);
  } catch (e) {
    setStatus("");
    showMessage(e.message);
  } finally {
    busy(false);
  }
}

$("file").addEventListener("change", (e) => {
  const f = e.target.files[0];
  if (f) uploadFile(f);
  e.target.value = "";  // choosing the same file again uploads it again
});
$("concept-files").addEventListener("change", (e) => {
  const n = e.target.files.length;
  $("concept-count").textContent = n ? `${n} chosen` : "";
});
$("concept-form").addEventListener("submit", addConcept);
init();
