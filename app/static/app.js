// The siamcam page: pick two images, POST them to the public /explain endpoint, show score, decision and
// the four overlays (Grad-CAM, or exact contributions with the regions that match across the two images).
// Plain browser JavaScript, no libraries, no external URLs.
"use strict";

// The colormaps the service accepts (app/colormaps.py), with their colours at 0, 1/6, ..., 1: entries 0, 42, 85,
// 128, 170, 213 and 255 of the service's tables (app/colormap_tables.py), so that the legend's gradient matches
// what the service draws (tests/app/test_overlays.py checks that they agree).
const COLORMAPS = {
  jet: ["#000080", "#0028ff", "#00d4ff", "#7dff7a", "#ffe600", "#ff4700", "#800000"],
  turbo: ["#30123b", "#4685fa", "#1ae4b6", "#a4fc3c", "#faba39", "#e4450a", "#7a0403"],
  viridis: ["#440154", "#443983", "#31688e", "#21918c", "#35b779", "#90d743", "#fde725"],
  inferno: ["#000004", "#320a5e", "#781c6d", "#bc3754", "#ed6925", "#fbb61a", "#fcffa4"],
  magma: ["#000004", "#2c115f", "#721f81", "#b73779", "#f1605d", "#feb078", "#fcfdbf"],
  plasma: ["#0d0887", "#5c01a6", "#9c179e", "#cc4778", "#ed7953", "#fdb42f", "#f0f921"],
  cividis: ["#00224e", "#2a3f6d", "#575d6d", "#7d7c78", "#a59c74", "#d2c060", "#fee838"],
  hot: ["#0b0000", "#790000", "#ea0000", "#ff5c00", "#ffca00", "#ffff5a", "#ffffff"],
  coolwarm: ["#3b4cc0", "#6f92f3", "#aac7fd", "#dddcdc", "#f7b89c", "#e7745b", "#b40426"],
  gray: ["#000000", "#2a2a2a", "#555555", "#808080", "#aaaaaa", "#d5d5d5", "#ffffff"],
};

const IMAGE_NAMES = ["First image", "Second image"];
const TOP_MATCHES = 5;
// Where a region matches on the other image: this colour, more opaque where the match adds more.
const MATCH_RGB = "255, 140, 0";
// Session storage only: the key lasts as long as this tab, is never written to disk by the page, and is
// never sent anywhere but this service.
const KEY_STORAGE = "siamcam.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  files: [null, null],   // the chosen File objects
  previews: [null, null], // their object URLs, shown as previews and as the "Original" in the result
  request: null,          // AbortController of the /explain request in flight, if any
  progressTimer: null,    // updates the seconds shown while waiting
  keyAsked: null,         // the Promise of the key the user is being asked for, shared by every waiting call
  mode: "pair",           // "pair": compare two images (/explain); "rank": one against many (/rank, rank.js)
};

// ---------------------------------------------------------------- API key

// fetch, with the API key when there is one; on 401 ask the user for a key, then send the request again.
async function apiFetch(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = new Headers(options.headers);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    // Forget the refused key, unless another call has stored a newer one meanwhile.
    if (key && sessionStorage.getItem(KEY_STORAGE) === key) sessionStorage.removeItem(KEY_STORAGE);
    await askForKey(key
      ? "The service did not accept this API key. Enter another one to continue."
      : "This service needs an API key. Enter yours to continue.");
  }
}

function askForKey(message) {
  if (!state.keyAsked) {
    state.keyAsked = new Promise((resolve) => {
      const form = $("key-form");
      $("key-message").textContent = message;
      form.hidden = false;
      $("api-key").focus();
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
        $("api-key").value = "";
        form.hidden = true;
        state.keyAsked = null;
        resolve();
      }, { once: true });
    });
  }
  return state.keyAsked;
}

// ---------------------------------------------------------------- model information

async function loadModelInfo() {
  try {
    const response = await apiFetch("/model");
    if (!response.ok) throw new Error(`status ${response.status}`);
    const model = await response.json();
    $("model-info").textContent =
      `Model ${model.name}, version ${model.version}, threshold ${model.threshold.toFixed(2)}`;
    offerMethods(model.explain_methods);
    $("model-report").hidden = !model.report;
  } catch (error) {
    $("model-info").textContent = `Model information is unavailable right now (${error.message}).`;
  }
}

// A link cannot send the API key: with one, the page fetches the report and hands it over as a file to open.
async function openReportWithKey(event) {
  if (!sessionStorage.getItem(KEY_STORAGE)) return; // no key needed: the browser opens the link itself
  event.preventDefault();
  const response = await apiFetch("/model/report");
  if (!response.ok) {
    showError("The model report is not available right now.", problemDetail(await readBody(response)), false);
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = "model-report.html";
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---------------------------------------------------------------- choosing images

function setFile(index, file) {
  if (state.previews[index]) URL.revokeObjectURL(state.previews[index]);
  state.files[index] = file;
  state.previews[index] = URL.createObjectURL(file);
  const preview = $(`preview${index + 1}`);
  preview.src = state.previews[index];
  preview.alt = `${IMAGE_NAMES[index]}: ${file.name}`;
  preview.hidden = false;
  hintOf(index).textContent = "Choose or drop another image";
  // An old result, or one on its way, no longer matches the images.
  cancelRequest();
  $("result").hidden = true;
  hideError();
  $("compare").disabled = !(state.files[0] && state.files[1]);
}

function hintOf(index) {
  return $(`picker${index + 1}`).querySelector(".picker-hint");
}

function setUpPicker(index) {
  const picker = $(`picker${index + 1}`);
  const input = $(`image${index + 1}`);
  const preview = $(`preview${index + 1}`);
  // The browser cannot draw it: say so instead of showing a broken image, and let the service judge it.
  preview.addEventListener("error", () => {
    preview.hidden = true;
    hintOf(index).textContent = `${state.files[index].name}: no preview, it may not be an image`;
  });
  input.addEventListener("change", () => {
    if (input.files.length > 0) setFile(index, input.files[0]);
  });
  acceptDrops(picker, (dropped) => {
    setFile(index, dropped[0]);
    // Two files dropped at once fill both pickers.
    if (dropped.length > 1) setFile(1 - index, dropped[1]);
  });
}

// Files dropped on `picker` go to `onFiles` (never called with none).
function acceptDrops(picker, onFiles) {
  picker.addEventListener("dragover", (event) => {
    event.preventDefault();
    picker.classList.add("dragging");
  });
  picker.addEventListener("dragleave", () => picker.classList.remove("dragging"));
  picker.addEventListener("drop", (event) => {
    event.preventDefault();
    picker.classList.remove("dragging");
    if (event.dataTransfer.files.length > 0) onFiles(event.dataTransfer.files);
  });
}

// ---------------------------------------------------------------- options

function setUpOptions() {
  const select = $("colormap");
  for (const name of Object.keys(COLORMAPS)) select.add(new Option(name, name));
  select.value = "jet";
  showLegendGradient();

  const opacity = $("opacity");
  opacity.addEventListener("input", () => {
    $("opacity-value").textContent = Number(opacity.value).toFixed(2);
  });
  // "change" fires once the slider is released, so dragging it asks the service only once.
  opacity.addEventListener("change", redrawIfShown);
  select.addEventListener("change", () => {
    showLegendGradient();
    redrawIfShown();
  });
  $("method").addEventListener("change", redrawIfShown);
}

// Exact contributions need a model exported with them (format version 2); older ones offer Grad-CAM only.
function offerMethods(methods) {
  for (const option of $("method").options) {
    option.disabled = !methods.includes(option.value);
    if (option.disabled) option.textContent += " (not offered by this model)";
  }
  if ($("method").selectedOptions[0].disabled) $("method").value = "gradcam";
}

function showLegendGradient() {
  $("legend-gradient").style.background = `linear-gradient(to right, ${COLORMAPS[$("colormap").value].join(", ")})`;
}

function redrawIfShown() {
  if (state.mode === "rank") {
    if (!$("rank-result").hidden) rank("Redrawing the overlays…");
  } else if (!$("result").hidden) explain("Redrawing the overlays…");
}

// ---------------------------------------------------------------- calling /explain

async function explain(progressLabel) {
  if (!(state.files[0] && state.files[1])) return;
  const form = new FormData();
  form.append("image1", state.files[0]);
  form.append("image2", state.files[1]);
  form.append("opacity", $("opacity").value);
  form.append("colormap", $("colormap").value);
  form.append("method", $("method").value);
  if ($("method").value === "contributions") {
    form.append("top_matches", String(TOP_MATCHES));
    form.append("include_correspondence", "true"); // the page finds each region's matches itself
  }
  await postForm("/explain", form, progressLabel, showResult);
}

// POST `form` to `path` and `show` the answer, or the problem in plain words; only the latest request's answer
// is shown (/explain's or /rank's, rank.js).
async function postForm(path, form, progressLabel, show) {
  cancelRequest();
  const controller = new AbortController();
  state.request = controller;
  hideError();
  showProgress(progressLabel);
  try {
    const response = await apiFetch(path, { method: "POST", body: form, signal: controller.signal });
    const body = await readBody(response);
    if (response.ok) show(body);
    else showError(describeProblem(response, body), problemDetail(body), retryable(response.status));
  } catch (error) {
    if (error.name === "AbortError") return; // cancelled: new images or a newer request
    showError("Could not reach the service. Check that it is running, then retry.", error.message, true);
  } finally {
    if (state.request === controller) {
      state.request = null;
      hideProgress();
    }
  }
}

function cancelRequest() {
  if (state.request) state.request.abort();
}

async function readBody(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return text; // e.g. an HTML error page from a proxy in front of the service
  }
}

// ---------------------------------------------------------------- progress and errors

function showProgress(label) {
  clearInterval(state.progressTimer);
  $("progress-text").textContent = label;
  const started = Date.now();
  const tick = () => {
    $("progress-seconds").textContent = `${Math.floor((Date.now() - started) / 1000)} s`;
  };
  tick();
  $("progress").hidden = false;
  state.progressTimer = setInterval(tick, 1000);
}

function hideProgress() {
  clearInterval(state.progressTimer);
  $("progress").hidden = true;
}

// One plain sentence per kind of failure; the service's own words follow underneath.
function describeProblem(response, body) {
  switch (response.status) {
    case 413:
      return "One of the files is too large for the service. Please choose a smaller image.";
    case 415:
      return "One of the files is not an image the service can read. Please choose a JPEG, PNG or similar image.";
    case 422:
      return "The service could not use these images or settings.";
    case 429:
      return `You have sent many requests in a short time. Please retry ${retryWhen(response)}.`;
    case 503:
      return `The service is busy right now. Please retry ${retryWhen(response)}.`;
    case 504:
      return "The service took too long to answer. Please retry.";
    default:
      return `Something went wrong (status ${response.status}${problemTitle(body)}).`;
  }
}

function retryWhen(response) {
  const seconds = response.headers.get("Retry-After");
  return !seconds ? "in a moment" : seconds === "1" ? "in 1 second" : `in ${seconds} seconds`;
}

function problemDetail(body) {
  if (typeof body === "object" && body !== null) return body.detail || body.title || "";
  return "";
}

function problemTitle(body) {
  return typeof body === "object" && body !== null && body.title ? `: ${body.title}` : "";
}

// Busy, rate limited, timed out or broken: the same request may work later. Other 4xx need other input.
function retryable(status) {
  return status >= 500 || status === 429;
}

function showError(message, detail, canRetry) {
  $("error-text").textContent = message;
  $("error-detail").textContent = detail ? `The service said: ${detail}` : "";
  $("retry").hidden = !canRetry;
  $("error").hidden = false;
  $("error").scrollIntoView({ block: "nearest" });
}

function hideError() {
  $("error").hidden = true;
}

// ---------------------------------------------------------------- the result

function showResult(data) {
  const score = $("score");
  score.textContent = data.score.toFixed(3);
  score.dataset.score = String(data.score);

  const threshold = data.threshold.toFixed(2);
  const decision = $("decision");
  decision.textContent = data.similar
    ? `Similar: the score is at or above the model's threshold of ${threshold}.`
    : `Not similar: the score is below the model's threshold of ${threshold}.`;
  decision.classList.toggle("similar", data.similar);

  const fill = $("bar-fill");
  fill.style.width = `${data.score * 100}%`;
  fill.classList.toggle("similar", data.similar);
  $("bar-threshold").style.left = `${data.threshold * 100}%`;
  $("bar-threshold-label").textContent = `threshold ${threshold}`;

  const { factual, counterfactual } = data.explanations;
  $("legend-factual").textContent = `here: ${factual.target}`;
  $("legend-counterfactual").textContent = `here: ${counterfactual.target}`;

  const rows = ["image1", "image2"].map(
    (key, index) => buildRow(key, IMAGE_NAMES[index], state.previews[index], factual, counterfactual));
  $("overlays").replaceChildren(...rows);
  showMatches(data.contributions);
  const result = $("result");
  if (result.hidden) {
    result.hidden = false;
    result.scrollIntoView({ block: "start" }); // a redraw leaves the reader where they are
  }
}

// One image's row of an explanation: `key` is image1 or image2 of the answer, `name` what the page calls it.
function buildRow(key, name, preview, factual, counterfactual) {
  const row = $("row-template").content.firstElementChild.cloneNode(true);
  row.querySelector(".row-title").textContent = name;

  const original = row.querySelector(".original img");
  original.src = preview;
  original.alt = `${name}, original`;

  fillFigure(row.querySelector(".factual"), key, name, "factual", factual,
    `Factual: why ${factual.target}`);
  fillFigure(row.querySelector(".counterfactual"), key, name, "counterfactual", counterfactual,
    `Counterfactual: what argues for ${counterfactual.target}`);
  return row;
}

function fillFigure(figure, key, name, kind, explanation, caption) {
  const overlay = explanation[key];
  const url = `data:${overlay.media_type};base64,${overlay.overlay}`;
  const img = figure.querySelector("img");
  img.src = url;
  img.width = overlay.width;
  img.height = overlay.height;
  img.alt = `${name} with its ${kind} heat map: regions that count for "${explanation.target}"`;
  figure.querySelector("figcaption").textContent = overlay.no_positive_evidence
    ? `${caption} (no region argues for it)`
    : caption;

  const link = figure.querySelector("a.download");
  link.href = url;
  link.download = `${key}-${kind}.${overlay.media_type.split("/")[1]}`;
  link.setAttribute("aria-label", `Download the ${kind} overlay of the ${name.toLowerCase()}`);
}

// ---------------------------------------------------------------- matches (exact contributions)

// What the contributions say in words (the service's `evidence` tells how to read its matches), the grid of
// regions over each original, and, when some pairs of regions stand out, those pairs listed and numbered on both
// images.
function showMatches(contributions) {
  const section = $("matches");
  section.hidden = !contributions;
  if (!contributions) return;
  const c = contributions;
  const margin = c.raw_logit - c.threshold_raw_logit;
  $("contributions-summary").textContent =
    `In the model's own units: the similarity's logit is ${c.raw_logit.toFixed(2)}, ` +
    `${Math.abs(margin).toFixed(2)} ${margin >= 0 ? "above" : "below"} the threshold's ` +
    `${c.threshold_raw_logit.toFixed(2)}. Regions of the first image add ${signed(c.image1.positive)} and ` +
    `${signed(c.image1.negative)}, those of the second ${signed(c.image2.positive)} and ${signed(c.image2.negative)}.`;
  const listed = c.evidence === "concentrated" ? c.matches : [];
  $("matches-summary").textContent = evidenceInWords(c, listed.length);
  $("match-list").replaceChildren(...listed.map(describeMatch));
  $("match-list").hidden = listed.length === 0;
  [0, 1].forEach((index) => buildMatchView(index, c, listed));
}

function evidenceInWords(c, listed) {
  const pairs = (c.grid[0] * c.grid[1]) ** 2;
  const strongest = c.matches.length;
  switch (c.evidence) {
    case "not_similar":
      return "The images were judged not similar, so no regions are listed as matching: the factual maps above " +
        "show what argued against similarity.";
    case "spread":
      return `No pair of regions stands out: the evidence for similarity is spread thin over both images (the ` +
        `${strongest} strongest of the ${pairs.toLocaleString("en")} pairs of regions carry ` +
        `${percent(c.matches_share)} of it together). The factual maps above show which regions count most.`;
    default: {
      const even = listed / pairs;
      return `${listed === 1 ? "This pair of regions carries" : `These ${listed} pairs of regions carry`} ` +
        `${percent(c.matches_share)} of the evidence for similarity together, ` +
        `${times(c.matches_share / even)} what an even spread over all ` +
        `${pairs.toLocaleString("en")} pairs would give them; the rest is spread over both images. ` +
        "They are numbered on the images below.";
    }
  }
}

function times(ratio) {
  return `${ratio.toFixed(ratio < 10 ? 1 : 0)} times`;
}

function describeMatch(match) {
  const item = document.createElement("li");
  const first = `${match.image1_region} of the first image`;
  item.textContent = `The ${first} with the ${match.image2_region} of the second: ` +
    `${percent(match.share)} of the evidence for similarity.`;
  // The pixels stay in the API's answer; here they are a tooltip for whoever wants them.
  item.title = `first image pixels [${match.image1_box.join(", ")}], second image [${match.image2_box.join(", ")}]`;
  return item;
}

function buildMatchView(index, c, listed) {
  const [rows, columns] = c.grid;
  const view = $(`match-view${index + 1}`);
  const frame = view.querySelector(".match-frame");
  const img = view.querySelector("img");
  img.src = state.previews[index];
  img.alt = `${IMAGE_NAMES[index]}, divided into the model's ${rows} by ${columns} regions`;
  const cells = view.querySelector(".cells");
  cells.style.gridTemplateColumns = `repeat(${columns}, 1fr)`;
  cells.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
  const buttons = [];
  for (let cell = 0; cell < rows * columns; cell++) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "cell";
    button.dataset.cell = String(cell);
    button.setAttribute("aria-label",
      `${IMAGE_NAMES[index]}, region in row ${Math.floor(cell / columns) + 1}, column ${cell % columns + 1}: ` +
      "show where it matches on the other image");
    for (const event of ["mouseenter", "focus", "click"]) {
      button.addEventListener(event, () => highlightMatches(index, cell, c));
    }
    buttons.push(button);
  }
  cells.replaceChildren(...buttons);
  // One box per region, with one label naming every listed pair it is part of (a region can match several).
  const ranks = new Map();
  listed.forEach((match, rank) => {
    const [row, column] = match[`image${index + 1}_cell`];
    const key = row * columns + column;
    ranks.set(key, [...(ranks.get(key) || []), rank + 1]);
  });
  frame.querySelectorAll(".match-box, .match-label").forEach((element) => element.remove());
  for (const [key, numbers] of ranks) {
    const box = matchBox(Math.floor(key / columns), key % columns, rows, columns);
    const label = document.createElement("span");
    label.className = "match-label";
    label.setAttribute("aria-hidden", "true"); // the list above says the same in words
    label.textContent = rankList(numbers);
    box.dataset.cell = label.dataset.cell = String(key);
    frame.append(box, label);
  }
  placeLabelsWhenShown(frame);
}

function matchBox(row, column, rows, columns) {
  const box = document.createElement("div");
  box.className = "match-box";
  box.style.left = `${(100 * column) / columns}%`;
  box.style.top = `${(100 * row) / rows}%`;
  box.style.width = `${100 / columns}%`;
  box.style.height = `${100 / rows}%`;
  return box;
}

// "1–3, 5": consecutive ranks as a range, so that a region's label stays short.
function rankList(numbers) {
  const parts = [];
  for (let start = 0; start < numbers.length;) {
    let end = start;
    while (end + 1 < numbers.length && numbers[end + 1] === numbers[end] + 1) end++;
    parts.push(end - start >= 2 ? `${numbers[start]}–${numbers[end]}` : numbers.slice(start, end + 1).join(", "));
    start = end + 1;
  }
  return parts.join(", ");
}

// Labels are placed in pixels, so again whenever the picture's size changes (a new picture, a resized window).
const labelPlacer = new ResizeObserver((entries) => entries.forEach((entry) => placeLabels(entry.target)));

function placeLabelsWhenShown(frame) {
  labelPlacer.observe(frame);
  const img = frame.querySelector("img");
  if (img.complete) placeLabels(frame);
  else img.addEventListener("load", () => placeLabels(frame), { once: true });
}

// Each label goes where it fits inside the picture without covering another label: a corner inside its box
// first, then just outside it, then the nearest free spot; smaller type before giving up a spot near its box.
function placeLabels(frame) {
  const width = frame.clientWidth;
  const height = frame.clientHeight;
  if (width === 0 || height === 0) return; // not laid out yet: the observer calls again once it is
  const placed = [];
  for (const label of frame.querySelectorAll(".match-label")) {
    const box = frame.querySelector(`.match-box[data-cell="${label.dataset.cell}"]`);
    const area = { x: box.offsetLeft, y: box.offsetTop, w: box.offsetWidth, h: box.offsetHeight };
    let spot = null;
    for (const size of LABEL_SIZES_REM) {
      label.style.fontSize = `${size}rem`;
      spot = nearBox(area, label.offsetWidth, label.offsetHeight, width, height)
        .find((candidate) => !placed.some((other) => overlap(candidate, other)));
      if (spot) break;
    }
    spot = spot || nearestFree(area, label.offsetWidth, label.offsetHeight, width, height, placed);
    label.style.left = `${spot.x}px`;
    label.style.top = `${spot.y}px`;
    placed.push(spot);
  }
}

const LABEL_SIZES_REM = [0.8, 0.7, 0.6];
const LABEL_GAP_PX = 2;

// Candidate spots for a w x h label of the box `area`, each moved inside the picture.
function nearBox(area, w, h, width, height) {
  const gap = LABEL_GAP_PX;
  const right = area.x + area.w - w - gap;
  const bottom = area.y + area.h - h - gap;
  return [
    [area.x + gap, area.y + gap], [right, area.y + gap], [area.x + gap, bottom], [right, bottom],
    [area.x, area.y - h - gap], [area.x, area.y + area.h + gap], [area.x - w - gap, area.y],
    [area.x + area.w + gap, area.y],
  ].map(([x, y]) => inside(x, y, w, h, width, height));
}

function nearestFree(area, w, h, width, height, placed) {
  const centre = { x: area.x + area.w / 2, y: area.y + area.h / 2 };
  let best = inside(area.x, area.y, w, h, width, height);
  let bestDistance = Infinity;
  for (let y = 0; y + h <= height; y += 2) {
    for (let x = 0; x + w <= width; x += 2) {
      const candidate = { x, y, w, h };
      const distance = Math.hypot(x + w / 2 - centre.x, y + h / 2 - centre.y);
      if (distance < bestDistance && !placed.some((other) => overlap(candidate, other))) {
        best = candidate;
        bestDistance = distance;
      }
    }
  }
  return best;
}

function inside(x, y, w, h, width, height) {
  return { x: Math.max(0, Math.min(x, width - w)), y: Math.max(0, Math.min(y, height - h)), w, h };
}

function overlap(a, b) {
  const gap = LABEL_GAP_PX;
  return a.x < b.x + b.w + gap && b.x < a.x + a.w + gap && a.y < b.y + b.h + gap && b.y < a.y + a.h + gap;
}

// Region `cell` of image `from`: on the other image, each region's share of what the two add together
// (the correspondence matrix's row for image 1, its column for image 2), scaled to the strongest match.
function highlightMatches(from, cell, c) {
  const values = from === 0 ? c.correspondence[cell] : c.correspondence.map((row) => row[cell]);
  const peak = Math.max(0, ...values);
  $(`match-view${from + 1}`).querySelectorAll(".cell").forEach((button) => {
    button.classList.toggle("source", Number(button.dataset.cell) === cell);
    button.style.backgroundColor = "transparent";
    delete button.dataset.strength;
  });
  $(`match-view${2 - from}`).querySelectorAll(".cell").forEach((button) => {
    const strength = peak > 0 ? Math.max(0, values[Number(button.dataset.cell)]) / peak : 0;
    button.classList.remove("source");
    button.dataset.strength = strength.toFixed(4);
    button.style.backgroundColor = `rgba(${MATCH_RGB}, ${(0.7 * strength).toFixed(3)})`;
  });
}

function signed(value) {
  return `${value >= 0 ? "+" : ""}${value.toFixed(2)}`;
}

// Two significant decimals for small shares: 0.58%, not 0.6%; 12.3%, not 12.30%.
function percent(share) {
  return `${(100 * share).toFixed(share < 0.01 ? 2 : 1)}%`;
}

// ---------------------------------------------------------------- start

setUpPicker(0);
setUpPicker(1);
setUpOptions();
loadModelInfo();
$("model-report").querySelector("a").addEventListener("click", openReportWithKey);
$("compare-form").addEventListener("submit", (event) => {
  event.preventDefault();
  submitInMode();
});
$("retry").addEventListener("click", submitInMode);

function submitInMode() {
  if (state.mode === "rank") rank("Ranking the candidates…");
  else explain("Comparing the images…");
}
