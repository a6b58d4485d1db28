// The ris web page: plain JavaScript over the REST API, no build step and no network beyond this server.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { k: 20, offset: 0, limit: 24, total: 0, seq: 0, query: null, uploads: new Map(), nextUpload: 1 };

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
  button.addEventListener("click", () => searchById(item.id, name, { scroll: true }));
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
  if (!result.matches.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "No matches: the collection has no other images to compare with yet.";
    grid.append(empty);
  }
  $("#results-title").textContent = result.matches.length ? `${result.matches.length} most similar` : "No matches";
  const hint = result.matches.length ? " · click one for more like it" : "";
  $("#results-note").textContent = `to ${queryName} · ${millis} ms${hint}`;
  document.body.dataset.state = result.matches.length ? "results" : "empty";
}

/** The query's picture, in the drop zone and beside the results' title (a phone shows one or the other). */
function showQuery(url) {
  const preview = $("#query-preview");
  const small = $("#results-query");
  for (const img of [preview, small]) {
    img.hidden = !url;
    if (url) img.src = url;
    else img.removeAttribute("src");
  }
  $("#dropzone").classList.toggle("has-image", Boolean(url));
}

/** The page as first opened: no query, no results. */
function showStart() {
  state.seq++; // a search still under way is dropped
  state.query = null;
  setBusy(false);
  clearMessage();
  showQuery(null);
  $("#results").replaceChildren();
  $("#results-title").textContent = "Search by image";
  $("#results-note").textContent = "Results appear here. Click a result to see more like it.";
  document.body.dataset.state = "start";
}

function setBusy(on) {
  document.body.classList.toggle("busy", on);
  $("#loading").hidden = !on;
  $("#results-section").setAttribute("aria-busy", String(on));
  if (on) document.body.dataset.state = "loading";
}

// --- searching ------------------------------------------------------------------------------------

/** The address and history entry of a query: a search by id lives in the URL; an upload cannot, so its
 * entry is the bare page (its file is kept in memory for Back/Forward while the page stays open). */
function remember(query, how) {
  if (!how) return;
  const entry = { k: state.k, name: query.name, ...(query.kind === "id" ? { id: query.id } : { upload: query.key }) };
  const url = query.kind === "id" ? `?id=${query.id}&k=${state.k}` : location.pathname;
  if (how === "push") history.pushState(entry, "", url);
  else history.replaceState(entry, "", url);
}

/** Run one search; on success it becomes the page's query (shown, remembered in history), on failure the
 * previous query and its results stay and the error is said above them. */
async function runSearch(query, request, { history: how = "push", scroll = false } = {}) {
  const seq = ++state.seq; // a newer search wins over a slower older one
  clearMessage();
  setBusy(true);
  const started = performance.now();
  try {
    const result = await request();
    if (seq !== state.seq) return;
    state.query = query;
    showQuery(query.url);
    renderResults(result, query.name, Math.round(performance.now() - started));
    remember(query, how);
    if (scroll) $("#results-section").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (error) {
    if (seq !== state.seq) return;
    showMessage(error.message);
    document.body.dataset.state = "error";
  } finally {
    if (seq === state.seq) setBusy(false);
  }
}

function searchFile(file, options = {}) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showMessage(`Not an image — ${file.name || "this file"} is ${file.type}; choose a photo (JPEG, PNG, WebP, …)`);
    document.body.dataset.state = "error";
    return;
  }
  let key = [...state.uploads].find(([, kept]) => kept.file === file)?.[0];
  if (key === undefined) {
    key = state.nextUpload++;
    state.uploads.set(key, { file, url: URL.createObjectURL(file) });
  }
  const name = file.name || "pasted image";
  const form = new FormData();
  form.append("file", file, name);
  form.append("k", String(state.k));
  const query = { kind: "file", key, name, url: state.uploads.get(key).url, file };
  runSearch(query, () => api("/api/search", { method: "POST", body: form }), options);
}

function searchById(id, name, options = {}) {
  const query = { kind: "id", id, name, url: `/api/images/${id}/thumbnail` };
  const url = `/api/search?id=${encodeURIComponent(id)}&k=${state.k}&exclude_self=true`;
  runSearch(query, () => api(url), options);
}

/** Search again for the current query (another k), replacing its history entry. */
function rerun() {
  const query = state.query;
  if (!query) return;
  if (query.kind === "id") searchById(query.id, query.name, { history: "replace" });
  else searchFile(query.file, { history: "replace" });
}

function setK(k) {
  const select = $("#k");
  if (![...select.options].some((o) => Number(o.value) === k)) select.append(new Option(String(k)));
  select.value = String(k);
  state.k = k;
}

/** Show what the address and history entry say (first load, Back, Forward). */
function restore(entry) {
  const params = new URLSearchParams(location.search);
  const k = Number(params.get("k") || entry?.k);
  if (Number.isInteger(k) && k >= 1 && k <= 100) setK(k);
  const id = params.get("id");
  const upload = entry?.upload !== undefined && state.uploads.get(entry.upload);
  if (id !== null && /^\d+$/.test(id)) searchById(Number(id), entry?.name || `image ${id}`, { history: null });
  else if (upload) searchFile(upload.file, { history: null });
  else showStart();
}

// --- the collection -------------------------------------------------------------------------------

async function loadCollection() {
  try {
    const info = await api(`/api/collection?offset=${state.offset}&limit=${state.limit}`);
    state.total = info.images;
    $("#collection-info").textContent =
      `${info.images.toLocaleString()} image${info.images === 1 ? "" : "s"} · ${info.model} (${info.pooling}, ${info.precision}) · ${info.dims}-d vectors`;
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
    rerun();
  });
  window.addEventListener("popstate", (event) => restore(event.state));
  $("#prev").addEventListener("click", () => page(-1));
  $("#next").addEventListener("click", () => page(1));
  state.k = Number($("#k").value);
  restore(history.state);
  loadCollection();
}

document.addEventListener("DOMContentLoaded", wire);
