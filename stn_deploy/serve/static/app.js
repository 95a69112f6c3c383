// stn-serve's page: pick a model, drop an image, show what /v2/models/{name}/classify answers.
// No external scripts: the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let topK = 5;
let originalUrl = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModels() {
  try {
    const response = await fetch("ui/models");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    models = body.models;
    topK = body.top_k;
    const select = $("model");
    select.innerHTML = "";
    for (const m of models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name;
      select.appendChild(option);
    }
    showModelInfo();
    setStatus("Ready: drop an image.");
  } catch (err) {
    setStatus(`Cannot list the models: ${err.message}`, true);
  }
}

function currentModel() {
  return models.find((m) => m.name === $("model").value);
}

function showModelInfo() {
  const m = currentModel();
  if (!m) return;
  const [c, h, w] = m.input_shape;
  $("model-info").textContent = `${m.classes} classes, input ${c}×${h}×${w}` + (m.has_warped ? "" : ", no warped output");
}

async function classify(file) {
  const m = currentModel();
  if (!m || !file) return;
  setStatus(`Classifying ${file.name} with ${m.name}…`);
  if (originalUrl) URL.revokeObjectURL(originalUrl);
  originalUrl = URL.createObjectURL(file);
  let response, body;
  try {
    response = await fetch(`v2/models/${encodeURIComponent(m.name)}/classify?images=1&top_k=${topK}`, {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: file,
    });
    body = await response.json();
  } catch (err) {
    setStatus(`Request failed: ${err.message}`, true);
    return;
  }
  if (!response.ok) {
    $("result").hidden = true;
    setStatus(`Error ${response.status}: ${body.error}`, true);
    return;
  }
  render(body);
  setStatus(`${file.name}: ${body.label} (${(100 * body.confidence).toFixed(1)}%)`);
}

function render(body) {
  $("label").textContent = body.label;
  $("label").classList.toggle("long", body.label.length > 3);
  $("confidence").textContent = `${(100 * body.confidence).toFixed(1)}%`;

  const bars = $("topk");
  bars.innerHTML = "";
  for (const entry of body.top_k) {
    const row = document.createElement("div");
    row.className = "bar";
    const pct = 100 * entry.prob;
    row.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="pct"></span>';
    row.querySelector(".name").textContent = entry.label;
    row.querySelector(".name").title = entry.label;
    row.querySelector(".fill").style.display = "block";
    row.querySelector(".fill").style.width = `${pct.toFixed(2)}%`;
    row.querySelector(".pct").textContent = `${pct.toFixed(1)}%`;
    bars.appendChild(row);
  }

  $("original").src = originalUrl;
  $("input").src = body.images.input;
  const note = $("warped-note");
  if (body.images.warped) {
    $("warped").src = body.images.warped;
    $("warped-figure").hidden = false;
    note.hidden = true;
  } else {
    $("warped-figure").hidden = true;
    note.textContent = body.images.warped_note;
    note.hidden = false;
  }

  const theta = $("theta");
  theta.innerHTML = "";
  $("theta-note").hidden = body.theta !== null;
  theta.hidden = body.theta === null;
  if (body.theta !== null) {
    for (const rowValues of body.theta) {
      const tr = document.createElement("tr");
      for (const v of rowValues) {
        const td = document.createElement("td");
        td.textContent = v.toFixed(4);
        tr.appendChild(td);
      }
      theta.appendChild(tr);
    }
  }
  $("result").hidden = false;
}

const drop = $("drop");
["dragenter", "dragover"].forEach((type) =>
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((type) =>
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => classify(e.dataTransfer.files[0]));
$("file").addEventListener("change", (e) => classify(e.target.files[0]));
$("model").addEventListener("change", () => {
  showModelInfo();
  const file = $("file").files[0];
  if (file) classify(file);
});
loadModels();
