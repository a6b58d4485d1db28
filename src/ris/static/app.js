// The ris web page: plain JavaScript over the REST API, no build step and no network beyond this server.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { k: 20, offset: 0, limit: 24, total: 0, seq: 0, previewUrl: null };

// --- talking to the API ---------------------------------------------------------------------------

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new Error(describeError(response.status, body));
  return body;
}

function describeError(status, body) {
  const detail = body && body.detail;
  let text = `the server answered HTTP ${status}`;
  if (typeof detail === "string") text = detail;
  else if (Array.isArray(detail)) text = detail.map((d) => d.msg).join("; ");
  const kind = { 400: "Unusable image", 413: "Too large", 415: "Not an image" }[status];
  return kind ? `${kind} — ${text}` : text;
}

// --- messages -------------------------------------------------------------------------------------

function showMessage(text) {
  const box = $("#message");
  box.textContent = text;
  box.hidden = false;
}

function clearMessage() {
  $("#message").hidden = true;
}

// --- rendering ------------------------------------------------------------------------------------

function baseName(path) {
  return path.split(/[\\/]/).pop();
}

function card(item, withScore) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.id = item.id;
  if (withScore) figure.dataset.rank = item.rank;

  const button = document.createElement("button");
  button.type = "button";
  button.title = `More like ${baseName(item.path)}`;
  const name = item.label ? `${item.label}/${baseName(item.path)}` : baseName(item.path);
  button.addEventListener("click", () => searchById(item.id, name));
  const img = document.createElement("img");
  img.src = item.thumbnail;
  img.alt = item.label ? `${item.label}: ${baseName(item.path)}` : baseName(item.path);
  img.loading = "lazy";
  img.draggable = true;
  img.addEventListener("dragstart", (event) => event.dataTransfer.setData("application/x-ris-id", String(item.id)));
  button.append(img);

  const caption = document.createElement("figcaption");
  if (withScore) {
    const top = document.createElement("div");
    top.className = "row";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${item.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = item.score.toFixed(3);
    score.dataset.similarity = item.similarity.toFixed(3);
    score.title = `score: what ranked it (never increases down the list); cosine similarity ${item.similarity.toFixed(3)} (1 = identical)`;
    top.append(rank, score);
    caption.append(top);
  }
  if (item.label) {
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = item.label;
    caption.append(label);
  }
  const link = document.createElement("a");
  link.className = "name";
  link.href = item.image;
  link.target = "_blank";
  link.rel = "noopener";
  link.textContent = baseName(item.path);
  link.title = `${item.path} (open the original)`;
  caption.append(link);

  figure.append(button, caption);
  return figure;
}

function renderResults(result, queryName, millis) {
  const grid = $("#results");
  grid.replaceChildren(...result.matches.map((m) => card(m, true)));
  $("#results-title").textContent = `${result.matches.length} most similar`;
  $("#results-note").textContent = `to ${queryName} · ${millis} ms · click one for more like it`;
}

function setPreview(url, isBlob) {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = isBlob ? url : null;
  const img = $("#query-preview");
  img.src = url;
  img.hidden = false;
  $("#dropzone").classList.add("has-image");
}

// --- searching ------------------------------------------------------------------------------------

async function runSearch(request, queryName) {
  const seq = ++state.seq; // a newer search wins over a slower older one
  clearMessage();
  document.body.classList.add("busy");
  const started = performance.now();
  try {
    const result = await request();
    if (seq === state.seq) renderResults(result, queryName, Math.round(performance.now() - started));
  } catch (error) {
    if (seq === state.seq) showMessage(error.message);
  } finally {
    if (seq === state.seq) document.body.classList.remove("busy");
  }
}

function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showMessage(`Not an image — ${file.name || "this file"} is ${file.type}; choose a photo (JPEG, PNG, WebP, …)`);
    return;
  }
  const name = file.name || "pasted image";
  setPreview(URL.createObjectURL(file), true);
  const form = new FormData();
  form.append("file", file, name);
  form.append("k", String(state.k));
  runSearch(() => api("/api/search", { method: "POST", body: form }), name);
}

function searchById(id, name) {
  setPreview(`/api/images/${id}/thumbnail`, false);
  window.scrollTo({ top: 0, behavior: "smooth" });
  runSearch(() => api(`/api/search?id=${encodeURIComponent(id)}&k=${state.k}`), name);
}

// --- the collection -------------------------------------------------------------------------------

async function loadCollection() {
  try {
    const info = await api(`/api/collection?offset=${state.offset}&limit=${state.limit}`);
    state.total = info.images;
    $("#collection-info").textContent =
      `${info.images.toLocaleString()} images · ${info.model} (${info.pooling}, ${info.precision}) · ${info.dims}-d vectors`;
    $("#sample").replaceChildren(...info.sample.map((row) => card(row, false)));
    const last = Math.min(state.offset + info.sample.length, info.images);
    $("#page-info").textContent = info.images ? `${state.offset + 1}–${last} of ${info.images}` : "empty";
    $("#prev").disabled = state.offset === 0;
    $("#next").disabled = last >= info.images;
  } catch (error) {
    $("#collection-info").textContent = `Cannot read the collection: ${error.message}`;
  }
}

function page(delta) {
  state.offset = Math.max(0, Math.min(state.offset + delta * state.limit, Math.max(0, state.total - 1)));
  loadCollection();
}

// --- wiring ---------------------------------------------------------------------------------------

function wire() {
  const zone = $("#dropzone");
  const input = $("#file-input");
  input.addEventListener("change", () => {
    searchFile(input.files[0]);
    input.value = ""; // picking the same file again searches again
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const id = event.dataTransfer.getData("application/x-ris-id");
    if (id) searchById(Number(id), `image ${id}`);
    else if (event.dataTransfer.files.length) searchFile(event.dataTransfer.files[0]);
    else showMessage("Nothing to search: drop an image file");
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) searchFile(item.getAsFile());
  });
  $("#k").addEventListener("change", (event) => {
    state.k = Number(event.target.value);
  });
  $("#prev").addEventListener("click", () => page(-1));
  $("#next").addEventListener("click", () => page(1));
  state.k = Number($("#k").value);
  loadCollection();
}

document.addEventListener("DOMContentLoaded", wire);
