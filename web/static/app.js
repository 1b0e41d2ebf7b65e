// The page of serve.py: draw on #pad, POST the drawing to /api/predict (debounced while drawing), show what
// the model saw, its probabilities and every layer's activations. No library, nothing from the internet.
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

let model = null;           // GET /api/model
let drawn = false;          // anything on the pad since the last clear
let timer = null;           // the pending debounced request
let inFlight = false;       // one request at a time ...
let again = false;          // ... and one more when the pad changed meanwhile
let picture = null;         // an uploaded photo (base64) until the pad is drawn on or cleared
let updates = 0;            // answers shown so far (document.body.dataset.updates, for tests)

function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  drawn = false;
  picture = null;
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

async function predict() {
  if (!drawn && picture === null) return;
  if (inFlight) { again = true; return; }
  inFlight = true;
  document.body.dataset.busy = "true";
  try {
    const body = JSON.stringify({ png: picture !== null ? picture : pad.toDataURL("image/png") });
    const response = await fetch("/api/predict", {
      method: "POST", headers: { "Content-Type": "application/json" }, body });
    const answer = await response.json();
    if (!drawn && picture === null) {
      showNothing("Draw a digit");
    } else if (response.status === 503) {
      say(answer.error);    // busy: keep the last answer and ask again when the server says
      clearTimeout(timer);
      timer = setTimeout(predict, 1000 * (Number(response.headers.get("Retry-After")) || 1));
    } else if (response.ok) {
      show(answer);
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

function say(text) {
  statusLine.textContent = text;
}

// ---- showing the answer ----
function show(answer) {
  drawGrey(seen, answer.input.flat(), 28, 28, 0, 1);
  prediction.textContent = String(answer.class);
  answer.probabilities.forEach((p, digit) => {
    const item = probabilityList.children[digit];
    item.querySelector(".bar").style.width = `${(100 * p).toFixed(1)}%`;
    item.querySelector(".value").textContent = p.toFixed(3);
    item.classList.toggle("best", digit === answer.class);
  });
  answer.layers.forEach(showLayer);
  updates += 1;
  document.body.dataset.updates = String(updates);
  say(`Prediction: ${answer.class} (${(100 * answer.probabilities[answer.class]).toFixed(1)}%)`);
}

function showNothing(text) {
  const grey = seen.getContext("2d");
  grey.fillStyle = "#000";
  grey.fillRect(0, 0, seen.width, seen.height);
  prediction.textContent = "–";
  for (const item of probabilityList.children) {
    item.querySelector(".bar").style.width = "0";
    item.querySelector(".value").textContent = "";
    item.classList.remove("best");
  }
  for (const canvas of layersBox.querySelectorAll("canvas")) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }
  say(text);
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

function showLayer(layer) {
  const panel = layersBox.querySelector(`[data-name="${CSS.escape(layer.name)}"]`);
  if (!panel) return;
  const flat = layer.values.flat(Infinity);
  const [low, high] = range(flat);
  panel.querySelector(".scale").textContent = `max |value| ${Math.max(Math.abs(low), Math.abs(high)).toFixed(3)}`;
  const canvases = panel.querySelectorAll("canvas");
  if (layer.shape.length === 3) {
    const [h, w, c] = layer.shape;
    canvases.forEach((canvas, channel) => {
      const values = new Array(h * w);
      for (let k = 0; k < h * w; k++) values[k] = flat[k * c + channel];
      drawGrey(canvas, values, w, h, low, high);
    });
  } else {
    drawGrey(canvases[0], flat, canvases[0].width, canvases[0].height, low, high);
  }
}

// ---- building the page for the model ----
function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function buildProbabilities() {
  for (let digit = 0; digit < 10; digit++) {
    const item = element("li", { "data-digit": String(digit) });
    item.append(element("span", { class: "digit" }, String(digit)),
                element("span", { class: "track" }), element("span", { class: "value" }));
    item.querySelector(".track").append(element("span", { class: "bar" }));
    probabilityList.append(item);
  }
}

function buildLayers() {
  model.layers.forEach((layer, index) => {
    const panel = element("figure", { class: "layer", "data-name": layer.name });
    const caption = element("figcaption");
    caption.append(element("strong", {}, `${index + 1}. ${layer.name}`),
                   ` (${layer.type}) output ${layer.shape_text} `, element("span", { class: "scale muted" }),
                   element("code", { class: "formula" }, layer.formula));
    const maps = element("div", { class: layer.shape.length === 3 ? "maps" : "strip" });
    if (layer.shape.length === 3) {
      const [h, w, c] = layer.shape;
      for (let channel = 0; channel < c; channel++) {
        maps.append(element("canvas", { class: "map pixels", width: String(w), height: String(h), role: "img",
          "aria-label": `${layer.name} feature map ${channel + 1} of ${c}` }));
      }
    } else {
      const n = layer.shape.reduce((a, b) => a * b, 1);
      const columns = Math.min(n, Math.max(50, Math.ceil(Math.sqrt(6 * n))));
      const strip = element("canvas", { class: "vector pixels", width: String(columns),
        height: String(Math.ceil(n / columns)), role: "img", "aria-label": `${layer.name} activations, ${n} values` });
      strip.style.width = `${Math.min(Math.max(columns * 12, STRIP_PX[0]), STRIP_PX[1])}px`;
      maps.append(strip);
    }
    panel.append(caption, maps);
    layersBox.append(panel);
  });
}

async function start() {
  clearPad();
  buildProbabilities();
  showNothing("Draw a digit");
  try {
    const response = await fetch("/api/model");
    model = await response.json();
  } catch (error) {
    say(`Cannot reach the server (${error.message})`);
    return;
  }
  document.getElementById("model-name").textContent =
    `Model "${model.model}": ${model.layers.length} layers, input ${model.input_shape.join("×")}`;
  buildLayers();
  document.body.dataset.ready = "true";
}

start();
