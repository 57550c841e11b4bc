// "One against many": a query image and several candidates, POSTed to the public /rank endpoint; the candidates
// are listed most similar first, as thumbnails with their scores and decisions, and the best match's explanation
// (the query and that candidate, as /explain draws them) is shown below. Uses app.js's helpers (loaded first).
"use strict";

const rankState = {
  query: null,        // the chosen File
  queryPreview: null, // its object URL
  candidates: [],     // [{file, preview}] in the order they were chosen: the index /rank answers refers to it
};

function setMode(mode) {
  state.mode = mode;
  cancelRequest();
  hideError();
  const ranking = mode === "rank";
  $("pair-pickers").hidden = ranking;
  $("rank-pickers").hidden = !ranking;
  $("compare").hidden = ranking;
  $("rank").hidden = !ranking;
  $("result").hidden = true;
  $("rank-result").hidden = true;
}

function setQuery(file) {
  if (rankState.queryPreview) URL.revokeObjectURL(rankState.queryPreview);
  rankState.query = file;
  rankState.queryPreview = URL.createObjectURL(file);
  const preview = $("query-preview");
  preview.src = rankState.queryPreview;
  preview.alt = `Query image: ${file.name}`;
  preview.hidden = false;
  $("query-picker").querySelector(".picker-hint").textContent = "Choose or drop another image";
  rankInputsChanged();
}

function setCandidates(files) {
  for (const candidate of rankState.candidates) URL.revokeObjectURL(candidate.preview);
  rankState.candidates = [...files].map((file) => ({ file, preview: URL.createObjectURL(file) }));
  $("candidate-thumbnails").replaceChildren(...rankState.candidates.map(({ file, preview }) => {
    const img = document.createElement("img");
    img.src = preview;
    img.alt = file.name;
    img.className = "thumbnail";
    return img;
  }));
  $("candidates-picker").querySelector(".picker-hint").textContent =
    `${files.length} candidate${files.length === 1 ? "" : "s"}: choose or drop others to replace them`;
  rankInputsChanged();
}

function rankInputsChanged() {
  cancelRequest();
  $("rank-result").hidden = true;
  hideError();
  $("rank").disabled = !(rankState.query && rankState.candidates.length > 0);
}

function setUpRankPickers() {
  document.querySelectorAll('input[name="mode"]').forEach((radio) => {
    radio.addEventListener("change", () => setMode(radio.value));
  });
  $("query").addEventListener("change", () => {
    if ($("query").files.length > 0) setQuery($("query").files[0]);
  });
  $("candidates").addEventListener("change", () => {
    if ($("candidates").files.length > 0) setCandidates($("candidates").files);
  });
  acceptDrops($("query-picker"), (files) => setQuery(files[0]));
  acceptDrops($("candidates-picker"), setCandidates);
}

// ---------------------------------------------------------------- calling /rank

async function rank(progressLabel) {
  if (!(rankState.query && rankState.candidates.length > 0)) return;
  const form = new FormData();
  form.append("query", rankState.query);
  for (const { file } of rankState.candidates) form.append("candidates", file);
  form.append("explain_top", "1");
  form.append("opacity", $("opacity").value);
  form.append("colormap", $("colormap").value);
  form.append("method", $("method").value);
  await postForm("/rank", form, progressLabel, showRanking);
}

// ---------------------------------------------------------------- the ranking

function showRanking(data) {
  const similar = data.candidates.filter((candidate) => candidate.similar).length;
  $("rank-summary").textContent =
    `${data.candidates.length} candidates against the query; ${similar} at or above the model's threshold of ` +
    `${data.threshold.toFixed(2)}.`;
  $("ranking").replaceChildren(...data.candidates.map(rankedItem));

  const best = data.candidates[0];
  const explanation = best && best.explanation;
  $("best-match").hidden = !explanation;
  if (explanation) {
    const bestName = `Best match: ${best.filename || `candidate ${best.index + 1}`}`;
    $("best-decision").textContent = best.similar
      ? `${bestName} is similar to the query (score ${best.score.toFixed(3)}).`
      : `${bestName} is the closest, but not similar to the query (score ${best.score.toFixed(3)}).`;
    $("best-decision").classList.toggle("similar", best.similar);
    const { factual, counterfactual } = explanation.explanations;
    $("rank-overlays").replaceChildren(
      buildRow("image1", "Query image", rankState.queryPreview, factual, counterfactual),
      buildRow("image2", bestName, rankState.candidates[best.index].preview, factual, counterfactual),
    );
  }
  const result = $("rank-result");
  if (result.hidden) {
    result.hidden = false;
    result.scrollIntoView({ block: "start" });
  }
}

function rankedItem(candidate) {
  const item = document.createElement("li");
  item.className = "ranked";
  item.dataset.index = String(candidate.index);
  item.dataset.score = String(candidate.score);

  const img = document.createElement("img");
  img.src = rankState.candidates[candidate.index].preview;
  img.alt = candidate.filename || `candidate ${candidate.index + 1}`;
  img.className = "thumbnail";
  const name = document.createElement("span");
  name.className = "ranked-name";
  name.textContent = candidate.filename || `candidate ${candidate.index + 1}`;
  const score = document.createElement("span");
  score.className = "ranked-score";
  score.textContent = candidate.score.toFixed(3);
  const decision = document.createElement("span");
  decision.className = `ranked-decision${candidate.similar ? " similar" : ""}`;
  decision.textContent = candidate.similar ? "similar" : "not similar";
  item.append(img, name, score, decision);
  return item;
}

setUpRankPickers();
