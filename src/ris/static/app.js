// The ris web page: plain JavaScript over the REST API, no build step and no network beyond this server.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  view: "search", k: 20, offset: 0, limit: 24, total: 0, seq: 0, query: null, uploads: new Map(), nextUpload: 1,
  lastSearch: null, // the search view's address and history entry, for its tab
  dupes: { threshold: null, verify: false, keep: "largest", offset: 0, limit: 20, total: 0, seq: 0, timer: 0, shown: false },
};

// --- talking to the API ---------------------------------------------------------------------------

/** The status and JSON body of a request; an error answer throws, with what the server said. */
async function fetchJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new Error(describeError(response.status, body));
  return { status: response.status, body };
}

async function api(url, options) {
  return (await fetchJson(url, options)).body;
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

/** A thumbnail to click for more like it, captioned with `top` (a row of facts, if any), its label and file name. */
function card(item, top) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.id = item.id;

  const button = document.createElement("button");
  button.type = "button";
  button.title = `More like ${baseName(item.path)}`;
  const name = item.label ? `${item.label}/${baseName(item.path)}` : baseName(item.path);
  button.addEventListener("click", () => moreLike(item.id, name));
  const img = document.createElement("img");
  img.src = item.thumbnail;
  img.alt = item.label ? `${item.label}: ${baseName(item.path)}` : baseName(item.path);
  img.loading = "lazy";
  img.draggable = true;
  img.addEventListener("dragstart", (event) => event.dataTransfer.setData("application/x-ris-id", String(item.id)));
  button.append(img);

  const caption = document.createElement("figcaption");
  if (top) caption.append(top);
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

/** A caption row: small facts side by side (rank and score, or a badge and a similarity). */
function factRow(...items) {
  const row = document.createElement("div");
  row.className = "row";
  for (const [className, text, title] of items) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    if (title) span.title = title;
    row.append(span);
  }
  return row;
}

function resultCard(match) {
  const similarity = match.similarity.toFixed(3);
  const title = `score: what ranked it (never increases down the list); cosine similarity ${similarity} (1 = identical)`;
  const facts = [["rank", `#${match.rank}`], ["score", match.score.toFixed(3), title]];
  if (match.inliers) facts.push(["badge same", "✓ same scene", `${match.inliers} keypoint matches agree: the same picture or scene (an edited copy's original, another shot of the place)`]);
  const figure = card(match, factRow(...facts));
  figure.dataset.rank = match.rank;
  figure.querySelector(".score").dataset.similarity = similarity;
  return figure;
}

function renderResults(result, queryName, millis) {
  const grid = $("#results");
  grid.replaceChildren(...result.matches.map(resultCard));
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

/** Photos far larger than the server ever looks at (verification and pasted-picture crops use at most 1,280 px)
 * are sent shrunk: a phone's 12-MP JPEG of 3-5 MB leaves as a few hundred KB, a tenth of the upload time on a
 * phone's link. Only JPEGs over 1 MB; the orientation the photo's EXIF gives is applied by the browser; anything
 * the browser cannot decode (HEIC outside Safari) is sent as it is and decoded by the server. */
const SEND_MAX_SIDE = 1600;
async function toSend(file) {
  if (file.type !== "image/jpeg" || file.size < 1_000_000 || typeof createImageBitmap !== "function") return file;
  try {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    const scale = SEND_MAX_SIDE / Math.max(bitmap.width, bitmap.height);
    if (scale >= 1) {
      bitmap.close();
      return file;
    }
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(bitmap.width * scale);
    canvas.height = Math.round(bitmap.height * scale);
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const blob = await new Promise((done) => canvas.toBlob(done, "image/jpeg", 0.92));
    return blob && blob.size < file.size ? blob : file;
  } catch {
    return file;
  }
}

/** What every browser shows in an <img>; for anything else (HEIC outside Safari, camera RAW) the server sends
 * the query back as a thumbnail to show instead. */
const SHOWN_TYPES = /^image\/(jpeg|png|gif|webp|avif|bmp|svg\+xml)$/;

function searchFile(file, options = {}) {
  if (!file) return;
  // a PDF or a video is refused here at once; an unknown type ("application/octet-stream": a RAW file where the
  // system names none) goes to the server, which reads by content
  if (file.type && !file.type.startsWith("image/") && file.type !== "application/octet-stream") {
    showMessage(`Not an image — ${file.name || "this file"} is ${file.type}; choose a photo (JPEG, PNG, WebP, …)`);
    document.body.dataset.state = "error";
    return;
  }
  let key = [...state.uploads].find(([, kept]) => kept.file === file)?.[0];
  if (key === undefined) {
    key = state.nextUpload++;
    state.uploads.set(key, { file, url: URL.createObjectURL(file), shown: SHOWN_TYPES.test(file.type) });
  }
  const name = file.name || "pasted image";
  const kept = state.uploads.get(key);
  kept.sent ??= toSend(file);
  const query = { kind: "file", key, name, url: kept.url, file };
  runSearch(query, async () => {
    const form = new FormData();
    form.append("file", await kept.sent, name);
    form.append("k", String(state.k));
    if (!kept.shown) form.append("preview", "true");
    const result = await api("/api/search", { method: "POST", body: form });
    if (result.preview && !kept.shown) {
      URL.revokeObjectURL(kept.url);
      query.url = kept.url = result.preview;
      kept.shown = true;
    }
    return result;
  }, options);
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
  if (params.get("view") === "duplicates") {
    showView("dupes");
    readDupesParams(params);
    loadDupes();
    return;
  }
  showView("search");
  const k = Number(params.get("k") || entry?.k);
  if (Number.isInteger(k) && k >= 1 && k <= 100) setK(k);
  const id = params.get("id");
  const upload = entry?.upload !== undefined && state.uploads.get(entry.upload);
  if (id !== null && /^\d+$/.test(id)) searchById(Number(id), entry?.name || `image ${id}`, { history: null });
  else if (upload) searchFile(upload.file, { history: null });
  else showStart();
}

// --- views ----------------------------------------------------------------------------------------

/** Show one view (search or dupes); work under way in the other is dropped, so it cannot change the address. */
function showView(view) {
  if (view !== "search") {
    state.seq++;
    setBusy(false);
  }
  if (view !== "dupes") {
    state.dupes.seq++;
    clearTimeout(state.dupes.timer);
  }
  state.view = view;
  document.body.dataset.view = view;
  $("#search-view").hidden = view !== "search";
  $("#dupes-view").hidden = view !== "dupes";
  for (const [tab, shows] of [["#tab-search", "search"], ["#tab-dupes", "dupes"]]) {
    if (shows === view) $(tab).setAttribute("aria-current", "page");
    else $(tab).removeAttribute("aria-current");
  }
  document.title = view === "dupes" ? "ris · duplicates" : "ris · reverse image search";
}

/** Go to a view by its tab: a new history entry (Back returns), the search view as it was left. */
function openView(view) {
  if (view === state.view) return;
  if (view === "dupes") {
    state.lastSearch = { entry: history.state, url: location.pathname + location.search };
    history.pushState({ view: "dupes" }, "", dupesAddress());
  } else {
    const last = state.lastSearch || { entry: null, url: location.pathname };
    history.pushState(last.entry, "", last.url);
  }
  restore(history.state);
}

/** A thumbnail's click: more like it, in the search view (from the duplicates view: a new history entry). */
function moreLike(id, name) {
  if (state.view === "search") {
    searchById(id, name, { scroll: true });
    return;
  }
  const entry = { k: state.k, id, name };
  history.pushState(entry, "", `?id=${id}&k=${state.k}`);
  showView("search");
  searchById(id, name, { history: null });
  window.scrollTo(0, 0);
}

// --- duplicates -----------------------------------------------------------------------------------

/** The duplicates view's settings as query parameters (defaults left out); `api` adds the page size. */
function dupesParams(api = false) {
  const d = state.dupes;
  const params = new URLSearchParams();
  if (d.threshold !== null) params.set("threshold", String(d.threshold));
  if (d.verify) params.set("verify", "true");
  if (d.keep !== "largest") params.set("keep", d.keep);
  if (d.offset) params.set("offset", String(d.offset));
  if (api) params.set("limit", String(d.limit));
  return params;
}

function dupesAddress() {
  const params = dupesParams().toString();
  return `?view=duplicates${params ? `&${params}` : ""}`;
}

function readDupesParams(params) {
  const d = state.dupes;
  const threshold = Number(params.get("threshold"));
  d.threshold = params.has("threshold") && Number.isFinite(threshold) ? threshold : null; // the server judges it
  d.verify = params.get("verify") === "true";
  d.keep = ["largest", "newest", "first"].includes(params.get("keep")) ? params.get("keep") : "largest";
  const offset = Number(params.get("offset"));
  d.offset = Number.isInteger(offset) && offset > 0 ? offset : 0;
  if (d.threshold !== null) setThreshold(d.threshold);
  $("#verify").checked = d.verify;
  $("#keep").value = d.keep;
}

function setThreshold(value) {
  $("#threshold").value = String(value);
  $("#threshold-value").textContent = Number(value).toFixed(2);
}

function setDupesBusy(on) {
  $("#dupes-loading").hidden = !on;
  $("#dupes-section").setAttribute("aria-busy", String(on));
  if (on) document.body.dataset.dupes = "loading";
}

function showDupesMessage(text) {
  const box = $("#dupes-message");
  box.textContent = text;
  box.hidden = !text;
}

/** Ask for the groups the settings say; a newer request wins; a failure keeps the groups shown and says why.
 * While the server is still finding them (202: the keypoint check of a large collection takes minutes) it is
 * asked again each second. */
async function loadDupes(again = false) {
  const d = state.dupes;
  const seq = again ? d.seq : ++d.seq;
  if (!again) {
    showDupesMessage("");
    setDupesBusy(true);
    $("#dupes-loading-text").textContent = "Finding duplicates…";
    d.started = performance.now();
  }
  let waiting = false;
  try {
    const { status, body } = await fetchJson(`/api/duplicates?${dupesParams(true)}`);
    if (seq !== d.seq) return;
    waiting = status === 202;
    if (waiting) {
      $("#dupes-loading-text").textContent = `Finding duplicates… ${Math.round(body.seconds)} s`;
      d.timer = setTimeout(() => loadDupes(true), 1000);
    } else renderDupes(body, Math.round(performance.now() - d.started));
  } catch (error) {
    if (seq !== d.seq) return;
    showDupesMessage(`Cannot find duplicates — ${error.message}`);
    if (!d.shown) $("#dupes-title").textContent = "No duplicates shown";
    document.body.dataset.dupes = "error";
  } finally {
    if (seq === d.seq && !waiting) setDupesBusy(false);
  }
}

function renderDupes(body, millis) {
  const d = state.dupes;
  d.total = body.total;
  d.shown = true;
  if (d.threshold === null) setThreshold(body.threshold);
  const threshold = body.threshold.toFixed(2);
  const groups = body.groups.map(groupElement);
  if (!groups.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = body.total
      ? "No groups on this page: go back a page."
      : `No duplicates at similarity ≥ ${threshold} among ${body.images.toLocaleString()} images. ` +
        "A lower threshold finds looser copies.";
    groups.push(empty);
  }
  $("#dupes-groups").replaceChildren(...groups);
  $("#dupes-title").textContent = body.total
    ? `${body.total.toLocaleString()} group${body.total === 1 ? "" : "s"} of duplicates`
    : "No duplicates";
  const found = `found in ${body.seconds.toFixed(1)} s${body.cached ? " (kept since)" : ""}`;
  const others = `${body.duplicates.toLocaleString()} image${body.duplicates === 1 ? "" : "s"} besides the ${body.keep} of each group · `;
  $("#dupes-note").textContent =
    `${body.total ? others : ""}similarity ≥ ${threshold}${body.verify ? ", keypoints checked" : ""} · ` +
    `${body.images.toLocaleString()} images · ${found}, shown in ${millis} ms`;
  const last = Math.min(body.offset + body.groups.length, body.total);
  $("#dupes-page").textContent = body.total ? `groups ${body.offset + 1}–${last} of ${body.total}` : "";
  $("#dupes-prev").disabled = body.offset === 0;
  $("#dupes-next").disabled = last >= body.total;
  $(".dupes-pager").hidden = body.total <= body.limit && body.offset === 0;
  const list = new URLSearchParams({ threshold: String(body.threshold), verify: String(body.verify), keep: body.keep });
  const download = $("#dupes-download");
  download.href = `/api/duplicates/list?${list}`;
  download.setAttribute("aria-disabled", String(!body.total));
  document.body.dataset.dupes = body.total ? "groups" : "empty";
}

function groupElement(group) {
  const article = document.createElement("article");
  article.className = "group";
  article.dataset.group = group.group;
  article.dataset.kind = group.kind;

  const head = document.createElement("div");
  head.className = "group-head";
  const title = document.createElement("h3");
  const kind = group.kind === "exact" ? "exact copies" : "near-duplicates";
  title.textContent = `Group ${group.group} · ${kind} · ${group.images.length} images`;
  const lowest = document.createElement("span");
  lowest.className = "muted";
  lowest.textContent = group.kind === "exact" ? "same bytes" : `lowest similarity ${group.similarity.toFixed(3)}`;
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy the others' paths";
  const others = group.images.filter((i) => !i.keep).map((i) => i.path);
  copy.title = `The ${others.length} path${others.length === 1 ? "" : "s"} besides the one kept, one a line (nothing is deleted)`;
  copy.addEventListener("click", () => copyText(others.join("\n") + "\n", copy));
  head.append(title, lowest, copy);

  const row = document.createElement("div");
  row.className = "grid group-row";
  row.append(...group.images.map(dupeCard));
  article.append(head, row);
  return article;
}

function dupeCard(image) {
  const facts = [];
  if (image.representative) facts.push(["badge rep", "representative", "The image the others are compared with"]);
  else {
    const matches = image.inliers ? `; ${image.inliers} agreeing keypoint matches with it` : "";
    const title = `cosine similarity to the representative (1 = identical)${matches}`;
    facts.push(["score", image.similarity.toFixed(3) + (image.inliers ? " ✓" : ""), title]);
  }
  if (image.keep) facts.push(["badge keep", "keep", "The one the keep rule keeps"]);
  const figure = card(image, factRow(...facts));
  figure.classList.toggle("rep", image.representative);
  figure.classList.toggle("kept", image.keep);
  figure.dataset.similarity = image.similarity;
  return figure;
}

/** Put text on the clipboard (the Clipboard API where the page may use it, else a selected text area). */
async function copyText(text, button) {
  let done = false;
  try {
    await navigator.clipboard.writeText(text);
    done = true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    done = document.execCommand("copy");
    area.remove();
  }
  if (!done) {
    showDupesMessage("This browser did not allow copying: use Download the list instead");
    return;
  }
  const label = button.textContent;
  button.textContent = "Copied ✓";
  button.disabled = true;
  setTimeout(() => {
    button.textContent = label;
    button.disabled = false;
  }, 1500);
}

/** A settings change: the first page of groups again, replacing the history entry (Back leaves the view). */
function dupesChanged(delay = 0) {
  const d = state.dupes;
  clearTimeout(d.timer);
  d.timer = setTimeout(() => {
    history.replaceState({ view: "dupes" }, "", dupesAddress());
    loadDupes();
  }, delay);
}

function dupesPage(delta) {
  const d = state.dupes;
  d.offset = Math.max(0, d.offset + delta * d.limit);
  dupesChanged();
  $("#dupes-section").scrollIntoView({ block: "start" });
}

// --- the collection -------------------------------------------------------------------------------

async function loadCollection() {
  try {
    const info = await api(`/api/collection?offset=${state.offset}&limit=${state.limit}`);
    state.total = info.images;
    $("#collection-info").textContent =
      `${info.images.toLocaleString()} image${info.images === 1 ? "" : "s"} · ${info.model} (${info.pooling}, ${info.precision}) · ${info.dims}-d vectors`;
    $("#sample").replaceChildren(...info.sample.map((row) => card(row)));
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
  for (const [tab, view] of [["#tab-search", "search"], ["#tab-dupes", "dupes"]]) {
    $(tab).addEventListener("click", (event) => {
      if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return; // a new tab
      event.preventDefault();
      openView(view);
    });
  }
  const threshold = $("#threshold");
  threshold.addEventListener("input", () => setThreshold(threshold.value));
  threshold.addEventListener("change", () => {
    state.dupes.threshold = Number(threshold.value);
    state.dupes.offset = 0;
    dupesChanged(250); // arrow keys change it a step at a time: ask once they pause
  });
  $("#verify").addEventListener("change", (event) => {
    state.dupes.verify = event.target.checked;
    state.dupes.offset = 0;
    dupesChanged();
  });
  $("#keep").addEventListener("change", (event) => {
    state.dupes.keep = event.target.value;
    dupesChanged();
  });
  $("#dupes-prev").addEventListener("click", () => dupesPage(-1));
  $("#dupes-next").addEventListener("click", () => dupesPage(1));
  $("#prev").addEventListener("click", () => page(-1));
  $("#next").addEventListener("click", () => page(1));
  state.k = Number($("#k").value);
  restore(history.state);
  loadCollection();
}

document.addEventListener("DOMContentLoaded", wire);
