// The side-by-side page: one query, two columns (fast dual encoder vs reranked), with stage timings.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TIER_NAMES = {
  mid: "mid fusion (ITM cross-attention)", early: "early fusion (single stream)", none: "none (no reranking)",
  blip: "BLIP ITM (its own vision features)", auto: "auto (reranks only unclear queries)",
};
// one size per screen density rather than per tile, so the tiles of every search share cached thumbnails
const THUMB_SIDE = Math.min(1024, 256 * Math.ceil(window.devicePixelRatio || 1));
const QUERY_IMAGE_SIDE = 512;  // the encoders see 64-224 px: never fetch the original to search by it
const IMAGE_ONLY = "Reranking matches a text against images; image queries use the dual encoder only.";
const COMPOSED_ONLY = "Reranking matches one text against images: with several added texts (+), this query uses the "
  + "dual encoder only.";

const columns = { fast: column("fast"), deep: column("deep") };
// query: what the columns show ({text} or {image: Blob, name}, with k and index); ticket: bumped by
// every new query, so an image still being fetched for an older one is dropped
const state = { query: null, fastIds: Promise.resolve(null), preview: null, ticket: 0, autoTier: null, explains: {} };

function column(name) {
  return { el: document.getElementById(name), tab: document.getElementById(`tab-${name}`), seq: 0, controller: null };
}

async function send(url, init) {
  const response = await fetch(url, init);
  if (response.ok) return response.json();
  const error = await response.json().catch(() => ({}));
  throw new Error(error.detail || `HTTP ${response.status} ${response.statusText}`);
}

const BOUNDS = { ">=": "gte", ">": "gt", "<=": "lte", "<": "lt" };

// "caption~circle width>=64 album=work" → the API's filter (null when empty); throws on a term it cannot read
function parseFilter(text) {
  const filter = {}, where = {};
  for (const term of (text || "").trim().split(/\s+/).filter(Boolean)) {
    const match = term.match(/^([^<>=~]+?)(>=|<=|=|>|<|~)(.+)$/);
    const [, field, op, raw] = match || [];
    const value = /^-?\d+(\.\d+)?$/.test(raw || "") ? Number(raw) : raw;
    if (op === "~" && field === "caption") filter.caption_contains = raw;
    else if (op === "~" && field === "path") filter.path_glob = raw;
    else if (op === "=") where[field] = value;
    else if (op && op !== "~") (where[field] = typeof where[field] === "object" ? where[field] : {})[BOUNDS[op]] = value;
    else throw new Error(`filter "${term}": write FIELD=VALUE, FIELD>=VALUE (also >, <=, <), caption~TEXT or path~GLOB`);
  }
  if (Object.keys(where).length) filter.where = where;
  return Object.keys(filter).length ? filter : null;
}

// "a red circle - a blue square + a green cross": terms of weight 1, those after " - " of weight -1 (rclip's +/-)
function textTerms(text) {
  const parts = (text || "").split(/\s+([+-])\s+/);
  const terms = [{ text: parts[0], weight: 1 }];
  for (let i = 1; i < parts.length; i += 2) terms.push({ text: parts[i + 1], weight: parts[i] === "-" ? -1 : 1 });
  return terms.filter((term) => term.text.trim());
}

// A query of several parts: an image and a text, or a text with + / - terms.
function composed(query) {
  return Boolean(query.text) && (Boolean(query.image) || textTerms(query.text).length > 1);
}

function base64Of(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(new Error(`cannot read ${blob.name || "the image"}`));
    reader.readAsDataURL(blob);
  });
}

async function composedBody(query) {
  const terms = textTerms(query.text);
  if (query.image) terms.push({ image: await base64Of(query.image), weight: 1 });
  return { terms, k: query.k };
}

async function searchRequest(query, extra, signal) {
  const filter = parseFilter(query.filter);  // a filter it cannot read fails the request, with its message
  if (query.image && !query.text) {  // multipart: the file's bytes as they are, no base64
    const form = new FormData();
    form.append("file", query.image, query.name);
    form.append("k", query.k);
    if (query.index) form.append("index", query.index);
    if (filter) form.append("filter", JSON.stringify(filter));
    return send("/v1/search/image", { method: "POST", body: form, signal });
  }
  const body = { ...(composed(query) ? await composedBody(query) : { text: query.text, k: query.k }), ...extra };
  if (query.index) body.index = query.index;
  if (filter) body.filter = filter;
  return send("/v1/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
}

function setBusy(col, busy) {
  col.el.setAttribute("aria-busy", String(busy));
  col.tab.classList.toggle("busy", busy);
}

// Makes the column's pending request stale; returns the number the next one will carry.
function cancel(col) {
  col.controller?.abort();
  col.controller = null;
  setBusy(col, false);
  return ++col.seq;
}

// Only a column's latest request may render: older ones are aborted, and an answer that comes anyway
// (the abort lost the race) is dropped.
async function latest(col, request, show) {
  const seq = cancel(col);
  const controller = new AbortController();
  col.controller = controller;
  setBusy(col, true);
  try {
    const result = await request(controller.signal);
    if (seq === col.seq) show(result);
  } catch (err) {
    if (seq === col.seq) showNote(col, err.message, "error");
  } finally {
    if (seq === col.seq) setBusy(col, false);
  }
}

function timingChips(col, result) {
  const chips = result.cached ? [["cached", result.timings_ms.total]]
    : ["encode", "search", "rerank", "fetch", "total"].map((s) => [s, result.timings_ms[s]]);
  col.el.querySelector(".timings").replaceChildren(...chips.map(([stage, ms]) => {
    const chip = element("span", `timing ${stage}`, `${stage} ${ms.toFixed(1)} ms`);
    chip.dataset.stage = stage;
    return chip;
  }));
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function sized(url, side) {
  const thumb = new URL(url, location.href);  // the hit's own parameters (index, version) kept
  thumb.searchParams.set("thumb", side);
  return thumb.href;
}

function baseName(path) {
  return (path || "").split(/[\\/]/).pop();
}

function moveMarker(rank, previousRank) {
  if (previousRank < 0) return Object.assign(element("span", "move up", "new"), { title: "not in the fast top k" });
  const up = previousRank > rank;
  const places = Math.abs(previousRank - rank);
  const marker = element("span", `move ${up ? "up" : "down"}`, `${up ? "↑" : "↓"}${places}`);
  marker.title = `${places} ${up ? "higher" : "lower"} than in the fast column`;
  return marker;
}

// The thumbnail with a marker on each object the reranker located (x, y: shares of the image's sides). The
// image is contained in a square tile: a marker's place in the tile follows the image's aspect once it loads.
function framed(img, located) {
  const frame = element("span", "frame");
  const markers = located.map((place) => {
    const marker = element("span", place.x > 0.5 ? "marker left" : "marker");  // its label toward the middle
    marker.append(element("span", "marker-label", place.phrase));
    marker.title = `the reranker found "${place.phrase}" here`;
    return marker;
  });
  const place = () => {
    const aspect = img.naturalWidth && img.naturalHeight ? img.naturalWidth / img.naturalHeight : 1;
    markers.forEach((marker, i) => {
      const { x, y } = located[i];
      marker.style.left = `${aspect >= 1 ? x * 100 : 50 + (x - 0.5) * 100 * aspect}%`;
      marker.style.top = `${aspect >= 1 ? 50 + (y - 0.5) * 100 / aspect : y * 100}%`;
    });
  };
  img.addEventListener("load", place);
  place();
  frame.append(img, ...markers);
  return frame;
}

function hitItem(hit, rank, previousRank) {
  const li = element("li", "hit");
  li.dataset.id = hit.id;
  const button = element("button", "hit-button");
  button.type = "button";
  button.title = "search by this image";
  const img = element("img", "thumb");
  img.src = sized(hit.url, THUMB_SIDE);
  img.alt = "";  // the caption beside it names the image
  img.loading = "lazy";
  const score = hit.rerank_score == null ? `cos ${hit.similarity.toFixed(3)}`
    : `cos ${hit.similarity.toFixed(3)} · p(match) ${Math.exp(hit.rerank_score).toFixed(2)}`;
  button.append(hit.explain?.length ? framed(img, hit.explain) : img,
    element("span", "caption", hit.caption || baseName(hit.path) || `#${hit.id}`),
    element("span", "score", score));
  if (previousRank !== undefined && previousRank !== rank) button.append(moveMarker(rank, previousRank));
  button.addEventListener("click", () => searchByHit(hit));
  li.append(button);
  return li;
}

function render(col, result, compareTo) {
  timingChips(col, result);
  col.el.querySelector(".hits").replaceChildren(...result.hits.map((hit, rank) =>
    hitItem(hit, rank, compareTo ? compareTo.indexOf(hit.id) : undefined)));
}

function showNote(col, message, kind = "") {
  col.el.querySelector(".timings").replaceChildren();
  const li = element("li", `note ${kind}`, message);
  if (kind === "error") li.setAttribute("role", "alert");
  col.el.querySelector(".hits").replaceChildren(li);
}

function note(col, message) {
  cancel(col);
  showNote(col, message);
}

function runFast(query) {
  let done;
  state.fastIds = new Promise((resolve) => { done = resolve; });
  latest(columns.fast, (signal) => searchRequest(query, { rerank: "none" }, signal), (result) => {
    render(columns.fast, result);
    done(result.hits.map((h) => h.id));
  }).finally(() => done(null));
}

function runDeep(query) {
  const tier = $("#tier").value;
  const col = columns.deep;
  col.el.dataset.tier = tier;
  $("#deep-what").textContent = TIER_NAMES[tier] || tier;
  // a composed query is reranked against its one added text (the API's rule), if it has one
  if (composed(query) && textTerms(query.text).filter((term) => term.weight > 0).length !== 1) {
    return note(col, COMPOSED_ONLY);
  }
  if (query.image && !query.text) return note(col, IMAGE_ONLY);
  if (tier === "none") {
    const loaded = $("#tier").options.length > 1;
    return note(col, loaded ? "No reranking (tier none): the fast column is the whole answer."
      : "No reranker is loaded in this service.");
  }
  const extra = { rerank: tier, rerank_k: numberIn($("#rerank-k").value, 1, 256, 16) };
  if (state.explains[tier === "auto" ? state.autoTier : tier]) extra.explain = true;  // markers: where it found what
  const fastIds = state.fastIds;  // the fast answer to this same query, for the move markers
  latest(col, (signal) => Promise.all([searchRequest(query, extra, signal), fastIds]), ([result, ids]) => {
    if (tier === "auto") {
      const scored = result.hits.filter((hit) => hit.rerank_score != null).length;  // the head it reranked
      $("#deep-what").textContent = result.reranked ? `auto: ${state.autoTier} reranked the ${scored} closest to the best`
        : "auto: not reranked (the dual encoder's best is clearly apart)";
    }
    render(col, result, ids);
  });
}

function search(query) {
  state.ticket += 1;
  state.query = query;
  $("#status").textContent = "";
  showImageQuery(query);
  writeUrl();
  runFast(query);
  runDeep(query);
}

function numberIn(text, low, high, fallback) {
  const value = Math.round(Number(text));
  return text && Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : fallback;
}

function formQuery() {
  return { text: $("#query").value.trim(), k: numberIn($("#k").value, 1, 100, 12), index: $("#index").value || null,
    filter: $("#filter").value.trim() };
}

// With an image searched for, the box's text joins it: image + text (clear drops the image).
function withImage(query) {
  return state.query?.image ? { ...query, image: state.query.image, name: state.query.name } : query;
}

function sameQuery(a, b) {
  return Boolean(b) && a.text === b.text && a.k === b.k && a.index === b.index && a.filter === b.filter;
}

function writeUrl() {
  const params = new URLSearchParams();
  if (state.query?.text) params.set("q", state.query.text);
  params.set("rerank", $("#tier").value);
  params.set("k", state.query?.k ?? $("#k").value);
  if (!$("#index-field").hidden && state.query?.index) params.set("index", state.query.index);
  if (state.query?.filter) params.set("filter", state.query.filter);
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

function choose(select, value) {
  if ([...select.options].some((option) => option.value === value)) select.value = value;
}

function readUrl() {
  const params = new URLSearchParams(location.search);
  choose($("#tier"), params.get("rerank"));
  choose($("#index"), params.get("index"));
  if (params.has("k")) $("#k").value = numberIn(params.get("k"), 1, 100, 12);
  $("#filter").value = params.get("filter") || "";
  const text = (params.get("q") || "").trim();
  if (text) {
    $("#query").value = text;
    search(formQuery());
  }
}

function showImageQuery(query) {
  if (state.preview) URL.revokeObjectURL(state.preview);
  state.preview = query.image ? URL.createObjectURL(query.image) : null;
  $("#image-query").hidden = !query.image;
  $("#image-query-with").textContent = query.image && query.text ? ` + "${query.text}"` : "";
  $("#image-query-thumb").src = state.preview || "";
  $("#image-query-name").textContent = query.image ? query.name : "";
}

function searchImage(blob, name) {
  $("#query").value = "";  // the box shows what the columns answer: now the image
  const { k, index, filter } = formQuery();
  search({ image: blob, name, k, index, filter });
}

async function searchByHit(hit) {
  const ticket = ++state.ticket;
  try {
    const response = await fetch(sized(hit.url, QUERY_IMAGE_SIDE));
    if (!response.ok) throw new Error(`image ${hit.id}: HTTP ${response.status}`);
    const blob = await response.blob();
    if (ticket === state.ticket) searchImage(blob, hit.caption || baseName(hit.path) || `image ${hit.id}`);
  } catch (err) {
    if (ticket === state.ticket) $("#status").textContent = err.message;
  }
}

function clearImage() {
  state.ticket += 1;
  state.query = null;
  showImageQuery({});
  for (const col of Object.values(columns)) {
    cancel(col);
    col.el.querySelector(".timings").replaceChildren();
    col.el.querySelector(".hits").replaceChildren();
  }
  writeUrl();
  $("#query").focus();
}

function showTab(name) {
  $("main").dataset.show = name;
  for (const [key, col] of Object.entries(columns)) {
    col.tab.setAttribute("aria-selected", String(key === name));
    col.tab.tabIndex = key === name ? 0 : -1;
  }
}

function onTabKey(event) {
  if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
  const next = $("main").dataset.show === "fast" ? "deep" : "fast";
  showTab(next);
  columns[next].tab.focus();
}

function droppedImage(event) {
  return [...(event.dataTransfer?.files || [])].find((file) => file.type.startsWith("image/"));
}

function onDrop(event) {
  document.body.classList.remove("dropping");
  if (!event.dataTransfer?.types.includes("Files")) return;  // text dropped into the box stays text
  event.preventDefault();
  const file = droppedImage(event);
  if (file) searchImage(file, file.name); else $("#status").textContent = "Drop an image file to search by it.";
}

function onDragOver(event) {
  if (!event.dataTransfer?.types.includes("Files")) return;
  event.preventDefault();  // allows the drop
  document.body.classList.add("dropping");
}

async function loadTiers() {
  const ready = await send("/readyz");
  const loaded = (ready.rerankers || []).filter((tier) => tier !== "none");
  state.autoTier = ready.auto;
  state.explains = Object.fromEntries(Object.entries(ready.tiers || {}).map(([tier, t]) => [tier, t.explains]));
  $("#tier").replaceChildren(...[...loaded, ...(ready.auto ? ["auto"] : []), "none"].map((tier) => {
    const option = element("option", "", TIER_NAMES[tier] || tier);
    option.value = tier;
    return option;
  }));
}

// The embedded model knows a small world: say which words, and offer queries it understands.
async function loadVocabulary() {
  const model = await send("/v1/model");
  if (!model.vocabulary) return;  // a real model's vocabulary is open
  const groups = Object.entries(model.vocabulary).map(([group, words]) => [element("b", "", `${group}: `),
    document.createTextNode(`${words.join(", ")}. `)]);
  $("#vocabulary").replaceChildren("The embedded model knows only these words. ", ...groups.flat());
  $("#examples").replaceChildren("Try: ", ...model.examples.map((text) => {
    const button = element("button", "example", text);
    button.type = "button";
    button.addEventListener("click", () => {
      $("#query").value = text;
      search(formQuery());
    });
    return button;
  }));
  $("#knows").hidden = false;
}

async function loadIndexes() {
  const names = await send("/indices-list");
  $("#index").replaceChildren(...names.map((name) => Object.assign(element("option", "", name), { value: name })));
  $("#index-field").hidden = names.length < 2;
}

function onTierChange() {
  const query = formQuery();
  if (query.text && !sameQuery(query, state.query)) return search(withImage(query));  // the box's text, as it is now
  if (!state.query) return;
  writeUrl();
  runDeep(state.query);
}

function onIndexChange() {
  const query = formQuery();
  if (query.text) search(withImage(query));
  else if (state.query?.image) search({ ...state.query, k: query.k, index: query.index });
}

$("#search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = formQuery();
  if (query.text) search(withImage(query));
});
$("#tier").addEventListener("change", onTierChange);
$("#index").addEventListener("change", onIndexChange);
$("#clear-image").addEventListener("click", clearImage);
$("#image-file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) searchImage(file, file.name);
  event.target.value = "";  // choosing the same file again is a new search
});
for (const [name, col] of Object.entries(columns)) {
  col.tab.addEventListener("click", () => showTab(name));
  col.tab.addEventListener("keydown", onTabKey);
}
document.addEventListener("dragover", onDragOver);
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) document.body.classList.remove("dropping");
});
document.addEventListener("drop", onDrop);
// the vocabulary line is a hint: the page works without it
Promise.all([loadIndexes(), loadTiers(), loadVocabulary().catch(() => null)]).then(() => {
  document.body.dataset.ready = "1";
  readUrl();
}).catch((err) => { $("#status").textContent = `The service did not answer: ${err.message}`; });
