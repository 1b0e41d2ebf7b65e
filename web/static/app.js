// The page of serve.py: draw on #pad, POST the drawing to /api/predict (debounced while drawing), show what
// the model saw, its probabilities and every layer's activations; then POST it with the true label to
// /api/backprop and show the loss, dL/dx and every layer's dL/dy and weight gradients; /api/teach applies
// optimizer steps to this page's copy of the model, /api/reset restores the trained one.
// No library, nothing from the internet.
"use strict";

const INK_WIDTH = 18;       // px on the 280 px pad: MNIST strokes are about 2-3 px of a 20 px high digit
const DEBOUNCE_MS = 120;    // wait this long after the last stroke movement before asking again
const STRIP_PX = [240, 600]; // dense activations: one cell per value, wrapped into rows this wide (min, max)

const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
const seen = document.getElementById("seen");
const statusLine = document.getElementById("status");
const prediction = document.getElementById("prediction");
const probabilityList = document.getElementById("probabilities");
const layersBox = document.getElementById("layers");
const learn = document.getElementById("learn");
const labelsBox = document.getElementById("labels");
const saliency = document.getElementById("saliency");
const teachStatus = document.getElementById("teach-status");
const beforeAfter = document.getElementById("before-after");
const changesBox = document.getElementById("changes");

let model = null;           // GET /api/model
let drawn = false;          // anything on the pad since the last clear
let timer = null;           // the pending debounced request
let inFlight = false;       // one request at a time ...
let again = false;          // ... and one more when the pad changed meanwhile
let picture = null;         // an uploaded photo (base64) until the pad is drawn on or cleared
let updates = 0;            // answers shown so far (document.body.dataset.updates, for tests)
let chosenLabel = null;     // the true label the learner clicked, or null: the prediction
let shownClass = null;      // the class of the last answer
const session = Array.from(crypto.getRandomValues(new Uint8Array(16)), b => b.toString(16).padStart(2, "0")).join("");
window.shown = {};          // the last answers' exact probabilities, for tests: predict, before, after

function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  drawn = false;
  picture = null;
  chosenLabel = null;
}

// ---- drawing with pointer events (mouse, touch, pen) ----
let last = null;

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

function stroke(from, to) {
  ink.strokeStyle = "#000";
  ink.lineWidth = INK_WIDTH;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(from[0], from[1]);
  ink.lineTo(to[0], to[1]);
  ink.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  picture = null;
  last = point(event);
  stroke(last, last);
  drawn = true;
  schedule();
});

pad.addEventListener("pointermove", (event) => {
  if (last === null) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of (events.length ? events : [event])) {
    const p = point(e);
    stroke(last, p);
    last = p;
  }
  schedule();
});

function endStroke() {
  if (last === null) return;
  last = null;
  clearTimeout(timer);
  predict();
}

pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  clearPad();
  clearTimeout(timer);
  showNothing("Draw a digit");
});

document.getElementById("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    chosenLabel = null;
    picture = reader.result;
    showPhoto(picture);
    predict();
  };
  reader.onerror = () => say("Cannot read that file");
  reader.readAsDataURL(file);
  event.target.value = "";
});

function showPhoto(url) {
  const image = new Image();
  image.onload = () => {
    clearPad();
    picture = url;
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * scale, h = image.height * scale;
    ink.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  };
  image.src = url;
}

// ---- talking to the server ----
function schedule() {
  clearTimeout(timer);
  timer = setTimeout(predict, DEBOUNCE_MS);
}

function pictureBody() {
  return { png: picture !== null ? picture : pad.toDataURL("image/png"), session };
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  return [response, await response.json()];
}

async function predict() {
  if (!drawn && picture === null) return;
  if (inFlight) { again = true; return; }
  inFlight = true;
  document.body.dataset.busy = "true";
  try {
    const [response, answer] = await post("/api/predict", pictureBody());
    if (!drawn && picture === null) {
      showNothing("Draw a digit");
    } else if (response.status === 503) {
      say(answer.error);    // busy: keep the last answer and ask again when the server says
      clearTimeout(timer);
      timer = setTimeout(predict, 1000 * (Number(response.headers.get("Retry-After")) || 1));
    } else if (response.ok) {
      show(answer);
      if (model.backprop) await backprop();
    } else {
      showNothing(answer.error || `The server answered ${response.status}`);
    }
  } catch (error) {
    say(`No answer from the server (${error.message})`);
  } finally {
    inFlight = false;
    document.body.dataset.busy = "false";
    if (again) { again = false; predict(); }
  }
}

async function backprop() {
  const label = chosenLabel !== null ? chosenLabel : shownClass;
  const [response, answer] = await post("/api/backprop", { ...pictureBody(), label });
  if (!response.ok) { say(answer.error || `The server answered ${response.status}`); return; }
  showGradients(answer);
}

function say(text) {
  statusLine.textContent = text;
}

// ---- showing the answer ----
function show(answer) {
  drawInput(seen, answer.input);
  shownClass = answer.class;
  prediction.textContent = String(answer.class);
  window.shown.predict = answer.probabilities;
  answer.probabilities.forEach((p, k) => {
    const item = probabilityList.children[k];
    item.querySelector(".bar").style.width = `${(100 * p).toFixed(1)}%`;
    item.querySelector(".value").textContent = p.toFixed(3);
    item.classList.toggle("best", k === answer.class);
  });
  answer.layers.forEach(showLayer);
  updates += 1;
  document.body.dataset.updates = String(updates);
  const taught = answer.taught ? ` (this page's copy, taught ${answer.taught} steps)` : "";
  say(`Prediction: ${answer.class} (${(100 * answer.probabilities[answer.class]).toFixed(1)}%)${taught}`);
}

function showNothing(text) {
  const grey = seen.getContext("2d");
  grey.fillStyle = "#000";
  grey.fillRect(0, 0, seen.width, seen.height);
  prediction.textContent = "–";
  shownClass = null;
  for (const item of probabilityList.children) {
    item.querySelector(".bar").style.width = "0";
    item.querySelector(".value").textContent = "";
    item.classList.remove("best");
  }
  for (const canvas of document.querySelectorAll("#layers canvas, #saliency")) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }
  document.getElementById("loss").textContent = "–";
  for (const button of labelsBox.children) button.setAttribute("aria-checked", "false");
  say(text);
}

function showGradients(answer) {
  for (const button of labelsBox.children) {
    button.setAttribute("aria-checked", String(Number(button.dataset.label) === answer.label));
  }
  document.getElementById("loss").textContent =
    `${answer.loss.toFixed(4)} for label ${answer.label} (p = ${answer.probabilities[answer.label].toFixed(4)})`;
  const [h, w, c] = model.input_shape;
  drawSigned(saliency, sumChannels(answer.input_gradient.flat(Infinity), c), w, h);
  for (const layer of answer.layers) {
    const panel = layersBox.querySelector(`[data-name="${CSS.escape(layer.name)}"]`);
    if (!panel) continue;
    const flat = layer.gradient.flat(Infinity);
    const top = Math.max(...flat.map(Math.abs));
    panel.querySelector(".gradient-scale").textContent = `max |dL/dy| ${top.toPrecision(3)}`;
    drawMaps(panel.querySelectorAll(".gradient canvas"), flat, layer.shape, drawSignedScaled(top));
    showWeights(panel, layer.weights);
  }
  document.body.dataset.gradients = String(Number(document.body.dataset.gradients || 0) + 1);
}

function showWeights(panel, weights) {
  const box = panel.querySelector(".weights");
  if (!box) return;
  const top = Math.max(...weights.map(weight => weight.norm), 1e-30);
  weights.forEach((weight, index) => {
    const row = box.children[index];
    row.querySelector(".bar").style.width = `${(100 * weight.norm / top).toFixed(1)}%`;
    row.querySelector(".value").textContent = weight.norm.toPrecision(3);
    if (weight.filters) {
      const [kh, kw, f] = weight.shape.length === 4 ? [weight.shape[0], weight.shape[1], weight.shape[3]] : [0, 0, 0];
      const flat = weight.filters.flat(Infinity);
      const scale = Math.max(...flat.map(Math.abs));
      row.querySelectorAll(".filters canvas").forEach((canvas, filter) => {
        const values = new Array(kh * kw);
        for (let k = 0; k < kh * kw; k++) values[k] = flat[k * f + filter];
        drawSignedScaled(scale)(canvas, values, kw, kh);
      });
    }
  });
}

// Values -> grey levels: [0, top] -> black..white, or [-top, top] -> black..white (grey = 0) if any is negative.
function range(values) {
  let low = 0, top = 0;
  for (const v of values) { if (v < low) low = v; if (Math.abs(v) > top) top = Math.abs(v); }
  return low < 0 ? [-top, top] : [0, top];
}

function drawGrey(canvas, values, width, height, low, high) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  const span = high - low || 1;
  for (let i = 0; i < width * height; i++) {
    const v = i < values.length ? Math.round(255 * Math.min(1, Math.max(0, (values[i] - low) / span))) : 0;
    image.data.set([v, v, v, 255], 4 * i);
  }
  context.putImageData(image, 0, 0);
}

// Signed values -> red (positive), white (0), blue (negative), scaled by `top` (the largest |value| shown).
function drawSignedScaled(top) {
  return (canvas, values, width, height) => {
    const context = canvas.getContext("2d");
    const image = context.createImageData(width, height);
    for (let i = 0; i < width * height; i++) {
      const t = i < values.length && top > 0 ? Math.max(-1, Math.min(1, values[i] / top)) : 0;
      const fade = Math.round(255 * (1 - Math.abs(t)));
      image.data.set(t >= 0 ? [255, fade, fade, 255] : [fade, fade, 255, 255], 4 * i);
    }
    context.putImageData(image, 0, 0);
  };
}

function drawSigned(canvas, values, width, height) {
  drawSignedScaled(Math.max(...values.map(Math.abs)))(canvas, values, width, height);
}

function sumChannels(flat, channels) {
  const sums = new Array(flat.length / channels).fill(0);
  flat.forEach((v, i) => { sums[Math.floor(i / channels)] += v; });
  return sums;
}

// The model's input [H, W, C]: grey (C = 1) or colour (C = 3), values in [0, 1].
function drawInput(canvas, input) {
  const [h, w, c] = model.input_shape;
  const flat = input.flat(Infinity);
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  for (let i = 0; i < w * h; i++) {
    const rgb = c === 3 ? [flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]] : [flat[i], flat[i], flat[i]];
    image.data.set([...rgb.map(v => Math.round(255 * v)), 255], 4 * i);
  }
  context.putImageData(image, 0, 0);
}

// One canvas per channel of a [H, W, C] layer, or one strip for a vector; `draw(canvas, values, w, h)`.
function drawMaps(canvases, flat, shape, draw) {
  if (shape.length === 3) {
    const [h, w, c] = shape;
    canvases.forEach((canvas, channel) => {
      const values = new Array(h * w);
      for (let k = 0; k < h * w; k++) values[k] = flat[k * c + channel];
      draw(canvas, values, w, h);
    });
  } else {
    draw(canvases[0], flat, canvases[0].width, canvases[0].height);
  }
}

function showLayer(layer) {
  const panel = layersBox.querySelector(`[data-name="${CSS.escape(layer.name)}"]`);
  if (!panel) return;
  const flat = layer.values.flat(Infinity);
  const [low, high] = range(flat);
  panel.querySelector(".scale").textContent = `max |value| ${Math.max(Math.abs(low), Math.abs(high)).toFixed(3)}`;
  drawMaps(panel.querySelectorAll(".forward canvas"), flat, layer.shape,
           (canvas, values, w, h) => drawGrey(canvas, values, w, h, low, high));
}

// ---- teaching ----
async function teach(steps) {
  if ((!drawn && picture === null) || shownClass === null) { teachStatus.textContent = "Draw a digit first"; return; }
  const label = chosenLabel !== null ? chosenLabel : shownClass;
  teachStatus.textContent = `Teaching ${steps} step${steps > 1 ? "s" : ""} with label ${label}…`;
  document.body.dataset.teaching = "true";
  try {
    const [response, answer] = await post("/api/teach", { ...pictureBody(), label, steps });
    if (!response.ok) { teachStatus.textContent = answer.error; return; }
    window.shown.before = answer.before;
    window.shown.after = answer.after;
    showBeforeAfter(answer);
    teachStatus.textContent = `${steps} step${steps > 1 ? "s" : ""} with label ${label}: p(${label}) ` +
      `${answer.before[label].toFixed(4)} → ${answer.after[label].toFixed(4)}, loss ` +
      `${answer.losses[0].toFixed(4)} → ${answer.losses[answer.losses.length - 1].toFixed(4)}; ` +
      `this page's copy has been taught ${answer.taught} steps.`;
    await refresh();
    document.body.dataset.taught = String(Number(document.body.dataset.taught || 0) + 1);
  } catch (error) {
    teachStatus.textContent = `No answer from the server (${error.message})`;
  } finally {
    document.body.dataset.teaching = "false";
  }
}

async function refresh() {
  if (inFlight) { again = true; return; }
  await predict();
}

function showBeforeAfter(answer) {
  beforeAfter.replaceChildren();
  answer.before.forEach((p, k) => {
    const item = element("li", { "data-digit": String(k) });
    if (k === answer.label) item.classList.add("best");
    const track = element("span", { class: "track" });
    track.append(element("span", { class: "bar before" }), element("span", { class: "bar after" }));
    track.children[0].style.width = `${(100 * p).toFixed(1)}%`;
    track.children[1].style.width = `${(100 * answer.after[k]).toFixed(1)}%`;
    item.append(element("span", { class: "digit" }, String(k)), track,
                element("span", { class: "value" }, `${p.toFixed(3)}→${answer.after[k].toFixed(3)}`));
    beforeAfter.append(item);
  });
  changesBox.replaceChildren(element("p", { class: "muted" },
    "How far each variable moved, |Δv| / |v| (the largest change of one weight in brackets):"));
  const top = Math.max(...answer.changes.map(change => change.relative), 1e-30);
  const list = element("ol", { class: "bars changes" });
  for (const change of answer.changes) {
    const item = element("li");
    const track = element("span", { class: "track" });
    track.append(element("span", { class: "bar" }));
    track.firstChild.style.width = `${(100 * change.relative / top).toFixed(1)}%`;
    item.append(element("span", { class: "name" }, change.name), track,
                element("span", { class: "value" }, `${(100 * change.relative).toFixed(2)}% (${change.largest.toPrecision(2)})`));
    if (change.relative === top) item.classList.add("best");
    list.append(item);
  }
  changesBox.append(list);
}

document.getElementById("teach1").addEventListener("click", () => teach(1));
document.getElementById("teach5").addEventListener("click", () => teach(5));
document.getElementById("reset").addEventListener("click", async () => {
  const [response, answer] = await post("/api/reset", { session });
  if (!response.ok) { teachStatus.textContent = answer.error; return; }
  beforeAfter.replaceChildren();
  changesBox.replaceChildren();
  teachStatus.textContent = "Reset: the trained model again.";
  await refresh();
  document.body.dataset.resets = String(Number(document.body.dataset.resets || 0) + 1);
});

// ---- building the page for the model ----
function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function buildProbabilities() {
  for (let k = 0; k < model.classes; k++) {
    const item = element("li", { "data-digit": String(k) });
    item.append(element("span", { class: "digit" }, String(k)),
                element("span", { class: "track" }), element("span", { class: "value" }));
    item.querySelector(".track").append(element("span", { class: "bar" }));
    probabilityList.append(item);
  }
}

function buildLabels() {
  for (let k = 0; k < model.classes; k++) {
    const button = element("button", { type: "button", role: "radio", "aria-checked": "false",
                                       "data-label": String(k) }, String(k));
    button.addEventListener("click", () => {
      chosenLabel = k;
      if (shownClass !== null) predict();
    });
    labelsBox.append(button);
  }
}

function mapCanvases(layer, what, label) {
  const maps = element("div", { class: layer.shape.length === 3 ? "maps" : "strip" });
  if (layer.shape.length === 3) {
    const [h, w, c] = layer.shape;
    for (let channel = 0; channel < c; channel++) {
      maps.append(element("canvas", { class: "map pixels", width: String(w), height: String(h), role: "img",
        "aria-label": `${layer.name} ${label} ${channel + 1} of ${c}` }));
    }
  } else {
    const n = layer.shape.reduce((a, b) => a * b, 1);
    const columns = Math.min(n, Math.max(50, Math.ceil(Math.sqrt(6 * n))));
    const strip = element("canvas", { class: "vector pixels", width: String(columns),
      height: String(Math.ceil(n / columns)), role: "img", "aria-label": `${layer.name} ${label}, ${n} values` });
    strip.style.width = `${Math.min(Math.max(columns * 12, STRIP_PX[0]), STRIP_PX[1])}px`;
    maps.append(strip);
  }
  const row = element("div", { class: what });
  row.append(maps);
  return row;
}

function buildLayers() {
  const backward = model.backprop ? model.backprop.layers : [];
  model.layers.forEach((layer, index) => {
    const panel = element("figure", { class: "layer", "data-name": layer.name });
    const caption = element("figcaption");
    caption.append(element("strong", {}, `${index + 1}. ${layer.name}`),
                   ` (${layer.type}) output ${layer.shape_text} `, element("span", { class: "scale muted" }),
                   element("code", { class: "formula" }, layer.formula));
    panel.append(caption, mapCanvases(layer, "forward", "feature map"));
    if (backward[index]) {
      const back = element("p", { class: "backward-caption" });
      back.append(element("strong", {}, "Backward: "), `dL/dy ${layer.shape_text} `,
                  element("span", { class: "gradient-scale muted" }),
                  element("code", { class: "formula" }, backward[index].backward_formula));
      panel.append(back, mapCanvases(layer, "gradient", "dL/dy map"));
      if (backward[index].variables.length) {
        const weights = element("ol", { class: "bars weights", "aria-label": `${layer.name} weight gradients` });
        for (const variable of backward[index].variables) {
          const item = element("li");
          const track = element("span", { class: "track" });
          track.append(element("span", { class: "bar" }));
          item.append(element("span", { class: "name" }, `|d${variable.name.split("/").pop()}|`), track,
                      element("span", { class: "value" }));
          if (variable.shape.length === 4) {
            const [kh, kw, , f] = variable.shape;
            const filters = element("span", { class: "filters" });
            filters.append(element("span", { class: "muted filters-caption" },
                                   `d${variable.name.split("/").pop()} of each of the ${f} filters, ${kh}×${kw}, summed over its input channels:`));
            for (let k = 0; k < f; k++) {
              filters.append(element("canvas", { class: "pixels", width: String(kw), height: String(kh), role: "img",
                "aria-label": `gradient of ${variable.name} filter ${k + 1} of ${f}, summed over its input channels` }));
            }
            item.append(filters);
          }
          weights.append(item);
        }
        panel.append(weights);
      }
    }
    layersBox.append(panel);
  });
}

function describeInput() {
  const [h, w, c] = model.input_shape;
  seen.width = w;
  seen.height = h;
  saliency.width = w;
  saliency.height = h;
  seen.setAttribute("aria-label", `The ${h}x${w} ${c === 3 ? "colour" : "grey"} input the model sees`);
  if (c === 3) {
    document.getElementById("seen-help").textContent =
      `${h}×${w} colour: the centre of the photo (or drawing), resized. Upload a photo of the kind it was trained on.`;
    document.getElementById("draw-help").textContent = "Upload a photo (or draw).";
  } else if (h !== 28 || w !== 28) {
    document.getElementById("seen-help").textContent =
      `${h}×${w}: the drawing prepared as MNIST's digits (28×28, white on black, centred), then resized.`;
  }
}

async function start() {
  clearPad();
  try {
    const response = await fetch("/api/model");
    model = await response.json();
  } catch (error) {
    say(`Cannot reach the server (${error.message})`);
    return;
  }
  document.getElementById("model-name").textContent =
    `Model "${model.model}": ${model.layers.length} layers, input ${model.input_shape.join("×")}, ${model.classes} classes`;
  describeInput();
  buildProbabilities();
  showNothing("Draw a digit");
  buildLayers();
  if (model.notes.length) {
    const notes = document.getElementById("notes");
    notes.textContent = model.notes.join(" ");
    notes.hidden = false;
  }
  if (model.backprop) {
    buildLabels();
    document.getElementById("loss-formula").textContent = model.backprop.loss_formula;
    learn.hidden = false;
    document.getElementById("teach-settings").textContent = model.teach
      ? `One step = ${model.teach.text}.` : "Teaching is not available for this export (see the note below).";
    for (const id of ["teach1", "teach5", "reset"]) document.getElementById(id).disabled = !model.teach;
  }
  document.body.dataset.ready = "true";
}

start();
