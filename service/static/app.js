// The side-by-side page: one query, two columns (fast dual encoder vs reranked), with stage timings.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { text: null, image: null, fastIds: [] };
const TIER_NAMES = { mid: "mid fusion (ITM cross-attention)", early: "early fusion (single stream)" };

async function post(body) {
  const response = await fetch("/v1/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(data.detail || `HTTP ${response.status}`);
  return data;
}

function timingChips(column, result) {
  const box = column.querySelector(".timings");
  box.replaceChildren();
  const chips = result.cached ? [["cached", result.timings_ms.total]]
    : ["encode", "search", "rerank", "total"].map((s) => [s, result.timings_ms[s]]);
  for (const [stage, ms] of chips) {
    const chip = document.createElement("span");
    chip.className = `timing ${stage}`;
    chip.dataset.stage = stage;
    chip.textContent = `${stage} ${ms.toFixed(1)} ms`;
    box.append(chip);
  }
}

function hitItem(hit, rank, previousRank) {
  const li = document.createElement("li");
  li.className = "hit";
  li.dataset.id = hit.id;
  li.title = "search by this image";
  const img = document.createElement("img");
  img.src = hit.url;
  img.alt = hit.caption || `image ${hit.id}`;
  img.loading = "lazy";
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.textContent = hit.caption || hit.path || `#${hit.id}`;
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = hit.rerank_score == null ? `cos ${hit.similarity.toFixed(3)}`
    : `cos ${hit.similarity.toFixed(3)} · p(match) ${Math.exp(hit.rerank_score).toFixed(2)}`;
  li.append(img, caption, score);
  if (previousRank !== undefined && previousRank !== rank) {
    const move = document.createElement("span");
    const up = previousRank < 0 || previousRank > rank;
    move.className = `move ${up ? "up" : "down"}`;
    move.textContent = previousRank < 0 ? "new" : `${up ? "↑" : "↓"}${Math.abs(previousRank - rank)}`;
    li.append(move);
  }
  li.addEventListener("click", () => searchByImage(hit));
  return li;
}

function render(column, result, compareTo) {
  timingChips(column, result);
  const list = column.querySelector(".hits");
  list.replaceChildren();
  result.hits.forEach((hit, rank) => {
    const previous = compareTo ? compareTo.indexOf(hit.id) : undefined;
    list.append(hitItem(hit, rank, previous));
  });
}

function note(column, message) {
  column.querySelector(".timings").replaceChildren();
  const li = document.createElement("li");
  li.className = "note";
  li.textContent = message;
  column.querySelector(".hits").replaceChildren(li);
}

function common() {
  const body = { k: Number($("#k").value) || 12 };
  if ($("#index").value) body.index = $("#index").value;
  if (state.image) body.image = state.image; else body.text = state.text;
  return body;
}

async function runFast() {
  const result = await post({ ...common(), rerank: "none" });
  state.fastIds = result.hits.map((h) => h.id);
  render($("#fast"), result);
}

async function runDeep() {
  const tier = $("#tier").value;
  if (!tier) {
    note($("#deep"), "No reranker is loaded in this service.");
    return;
  }
  $("#deep-what").textContent = TIER_NAMES[tier] || tier;
  $("#deep").dataset.tier = tier;
  if (state.image) {
    note($("#deep"), "Reranking matches a text against images; image queries use the dual encoder only.");
    return;
  }
  const result = await post({ ...common(), rerank: tier, rerank_k: Number($("#rerank-k").value) || 16 });
  render($("#deep"), result, state.fastIds);
}

async function run(which) {
  $("#status").textContent = "";
  document.body.dataset.busy = "1";
  try {
    if (which === "deep") await runDeep(); else { await runFast(); await runDeep(); }
  } catch (err) {
    $("#status").textContent = err.message;
  } finally {
    delete document.body.dataset.busy;
  }
}

async function searchByImage(hit) {
  const blob = await (await fetch(hit.url)).blob();
  const dataUrl = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(blob);
  });
  state.image = String(dataUrl).split(",", 2)[1];
  state.text = null;
  $("#image-query").hidden = false;
  $("#image-query-thumb").src = hit.url;
  await run("both");
}

async function loadTiers() {
  const ready = await (await fetch("/readyz")).json();
  const tiers = (ready.rerankers || []).filter((t) => t !== "none");
  $("#tier").replaceChildren(...tiers.map((tier) => {
    const option = document.createElement("option");
    option.value = tier;
    option.textContent = TIER_NAMES[tier] || tier;
    return option;
  }));
}

async function loadIndexes() {
  const names = await (await fetch("/indices-list")).json();
  for (const name of names) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("#index").append(option);
  }
  $("#index").hidden = names.length < 2;
}

$("#search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.text = $("#query").value.trim();
  state.image = null;
  $("#image-query").hidden = true;
  if (state.text) run("both");
});
$("#tier").addEventListener("change", () => { if (state.text || state.image) run("deep"); });
$("#clear-image").addEventListener("click", () => { state.image = null; $("#image-query").hidden = true; });
Promise.all([loadIndexes(), loadTiers()]).then(() => {
  document.body.dataset.ready = "1";
  const initial = new URLSearchParams(location.search).get("q");
  if (initial) { $("#query").value = initial; state.text = initial; run("both"); }
});
