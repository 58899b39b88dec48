// dinolab feature explorer: talks to the JSON API of dinolab/viz/serve.py.
// Names from the folder are user data: they only ever go into textContent, never innerHTML.
"use strict";

const state = {
  config: null,
  selection: [],          // image ids shown, in order
  cards: new Map(),       // id -> {card, photo, canvas, marker, grid}
  uploadNames: new Map(), // upload id -> original file name
  click: null,            // last clicked patch {src, row, col}
};

// Inferno-like colour ramp (5 stops), value in [0, 1] -> [r, g, b].
const RAMP = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

function rampColour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const f = x - i;
  return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
}

function $(id) { return document.getElementById(id); }

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(url, options) {
  const response = await fetch(url, options);
  let body;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function displayName(id) { return state.uploadNames.get(id) || id; }

function imageUrl(id) { return "/api/image?id=" + encodeURIComponent(id); }

function idsQuery(ids) { return ids.map((id) => "id=" + encodeURIComponent(id)).join("&"); }

function renderFolder(images) {
  const list = $("folder");
  list.replaceChildren();
  for (const id of images) {
    const li = document.createElement("li");
    li.textContent = id;
    li.dataset.id = id;
    li.addEventListener("click", () => toggle(id));
    list.appendChild(li);
  }
}

function markFolderSelection() {
  for (const li of $("folder").children) li.classList.toggle("selected", state.selection.includes(li.dataset.id));
}

function toggle(id) {
  const at = state.selection.indexOf(id);
  if (at >= 0) {
    state.selection.splice(at, 1);
  } else if (state.selection.length >= state.config.max_selection) {
    setStatus(`At most ${state.config.max_selection} images at once; remove one first.`, true);
    return;
  } else {
    state.selection.push(id);
  }
  refresh();
}

async function refresh() {
  markFolderSelection();
  if (state.selection.length === 0) {
    $("cards").replaceChildren();
    state.cards.clear();
    setStatus("Pick an image on the left or upload one.");
    return;
  }
  setStatus("Computing PCA maps…");
  try {
    const { images } = await api("/api/pca?" + idsQuery(state.selection));
    renderCards(images);
    const click = state.click;
    if (click && state.selection.includes(click.src)) await showSimilarity(click);
    else setStatus("Click a patch of an image to see its similarity map.");
  } catch (err) {
    setStatus(err.message, true);
  }
}

function renderCards(images) {
  const cards = $("cards");
  cards.replaceChildren();
  state.cards.clear();
  for (const info of images) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.id = info.id;

    const caption = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `${displayName(info.id)} (foreground ${Math.round(100 * info.foreground)}%)`;
    const nnButton = document.createElement("button");
    nnButton.textContent = "neighbours";
    nnButton.addEventListener("click", () => showNeighbours(info.id));
    const removeButton = document.createElement("button");
    removeButton.textContent = "remove";
    removeButton.addEventListener("click", () => toggle(info.id));
    caption.append(name, nnButton, removeButton);

    const stack = document.createElement("div");
    stack.className = "stack";
    const photo = document.createElement("img");
    photo.className = "photo";
    photo.alt = displayName(info.id);
    photo.src = imageUrl(info.id);
    const canvas = document.createElement("canvas");
    canvas.className = "heatmap";
    canvas.width = info.grid[1];
    canvas.height = info.grid[0];
    const marker = document.createElement("div");
    marker.className = "marker";
    marker.hidden = true;
    stack.append(photo, canvas, marker);
    stack.addEventListener("click", (ev) => onPatchClick(ev, info, stack));

    const pca = document.createElement("img");
    pca.className = "pca";
    pca.alt = "PCA map";
    pca.src = info.pca_png;

    const pair = document.createElement("div");
    pair.className = "pair";
    pair.append(stack, pca);
    card.append(caption, pair);
    cards.appendChild(card);
    state.cards.set(info.id, { card, photo, canvas, marker, grid: info.grid });
  }
}

function onPatchClick(ev, info, stack) {
  const rect = stack.getBoundingClientRect();
  const [h, w] = info.grid;
  const col = Math.min(w - 1, Math.max(0, Math.floor(((ev.clientX - rect.left) / rect.width) * w)));
  const row = Math.min(h - 1, Math.max(0, Math.floor(((ev.clientY - rect.top) / rect.height) * h)));
  state.click = { src: info.id, row, col };
  showSimilarity(state.click);
}

async function showSimilarity(click) {
  setStatus(`Similarity of patch (${click.row}, ${click.col}) of ${displayName(click.src)}…`);
  try {
    const query = `src=${encodeURIComponent(click.src)}&row=${click.row}&col=${click.col}&` + idsQuery(state.selection);
    const { maps } = await api("/api/similarity?" + query);
    const all = maps.flatMap((m) => m.values);
    const lo = Math.min(...all);
    const hi = Math.max(...all);
    for (const m of maps) drawHeatmap(state.cards.get(m.id), m, lo, hi);
    placeMarker(click);
    setStatus(`Cosine similarity to patch (${click.row}, ${click.col}) of ${displayName(click.src)}: ` +
      `${lo.toFixed(2)} (dark) to ${hi.toFixed(2)} (bright).`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function drawHeatmap(entry, map, lo, hi) {
  if (!entry) return;
  const [h, w] = map.grid;
  const ctx = entry.canvas.getContext("2d");
  const pixels = ctx.createImageData(w, h);
  const span = hi - lo || 1;
  map.values.forEach((v, i) => {
    const [r, g, b] = rampColour((v - lo) / span);
    pixels.data.set([r, g, b, 255], 4 * i);
  });
  ctx.putImageData(pixels, 0, 0);
  entry.canvas.dataset.ready = "1";
}

function placeMarker(click) {
  for (const [id, entry] of state.cards) {
    entry.marker.hidden = id !== click.src;
    if (id !== click.src) continue;
    const [h, w] = entry.grid;
    Object.assign(entry.marker.style, {
      left: `${(100 * click.col) / w}%`, top: `${(100 * click.row) / h}%`,
      width: `${100 / w}%`, height: `${100 / h}%`,
    });
  }
}

async function showNeighbours(id) {
  setStatus(`Finding neighbours of ${displayName(id)} (the first time, every folder image is encoded)…`);
  try {
    const { neighbours } = await api(`/api/neighbours?id=${encodeURIComponent(id)}&k=8`);
    $("neighbours-panel").hidden = false;
    $("neighbours-title").textContent = `Nearest neighbours of ${displayName(id)} (class-token cosine)`;
    const list = $("neighbours");
    list.replaceChildren();
    for (const n of neighbours) {
      const li = document.createElement("li");
      const img = document.createElement("img");
      img.src = imageUrl(n.id);
      img.alt = n.id;
      const label = document.createElement("span");
      label.textContent = `${n.id} · ${n.score.toFixed(3)}`;
      li.append(img, label);
      li.addEventListener("click", () => { if (!state.selection.includes(n.id)) toggle(n.id); });
      list.appendChild(li);
    }
    setStatus(neighbours.length ? "Click a neighbour to add it to the view." : "No other image in the folder.");
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function onUpload(input) {
  const file = input.files[0];
  if (!file) return;
  if (file.size > state.config.max_upload_bytes) {
    setStatus(`${file.name} is ${file.size} bytes; the limit is ${state.config.max_upload_bytes}.`, true);
    input.value = "";
    return;
  }
  setStatus(`Uploading ${file.name}…`);
  try {
    const { id } = await api("/api/upload", {
      method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file,
    });
    state.uploadNames.set(id, file.name);
    if (!state.selection.includes(id)) {
      if (state.selection.length >= state.config.max_selection) state.selection.shift();
      state.selection.push(id);
    }
    await refresh();
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    input.value = "";
  }
}

async function init() {
  try {
    state.config = await api("/api/config");
    const { images } = await api("/api/images");
    renderFolder(images);
    $("upload").addEventListener("change", (ev) => onUpload(ev.target));
    setStatus(`${images.length} images in the folder. Pick some on the left or upload one.`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

init();
