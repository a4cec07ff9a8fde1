// The page of `python3 mnist_net.py --serve`: plain JavaScript, no library.
//
// The server (tools/page_server.py) does all the network's work with the chapter's own code,
// mnist_net.py; this file only asks it and draws the answers:
//   GET  /api/status      -> the training so far (phase, curves, first-layer filters)
//   POST /api/predict     -> the pad's pixels in; the answer, the prepared picture, the
//                            probabilities, the maps after every layer and the saliency out
//   GET  /api/test_digit  -> the same for a random test image, with its label
//                            (?index=I: test image I; ?class=K: the saliency of class K)
//   GET  /api/mistake     -> the same for a test image the network gets wrong
// The comments say which part of mnist_net.py computes what each part of the page shows.
"use strict";

const STATUS_EVERY_MS = 500;   // how often the training view asks for news
const PEN_WIDTH = 19;          // a fifteenth of the 280-pixel pad: MNIST's 2-pixel strokes, ten times larger
const MAPS_SIDE = 84;          // about how many screen pixels wide each map is drawn

let classes = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];   // /api/status sends the real names
let isFashion = false;

// ---------------------------------------------------------------------------------------------
// 1. Asking the server
// ---------------------------------------------------------------------------------------------

// GET or POST some JSON; a reply that is not 200 becomes an Error carrying the server's one line.
async function askServer(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const reply = await fetch(path, options);
  let data = null;
  try {
    data = await reply.json();
  } catch (e) {
    // not JSON: handled just below
  }
  if (!reply.ok) {
    const error = new Error((data && data.error) || `the server answered ${reply.status}`);
    error.status = reply.status;
    throw error;
  }
  return data;
}

function showError(message) {
  document.getElementById("error-line").textContent = message;
}

// ---------------------------------------------------------------------------------------------
// 2. Watch it learn: poll /api/status while the network trains.
//    The server runs the chapter's train() (section 5 of mnist_net.py) in a background thread
//    and keeps, about twice a second, the mean loss and accuracy of the steps since the last point.
// ---------------------------------------------------------------------------------------------

let padStarted = false;

async function pollStatus() {
  let status;
  try {
    status = await askServer("/api/status");
    showError("");
  } catch (e) {
    showError(`No answer from the server (${e.message}); is python3 mnist_net.py --serve still running?`);
    setTimeout(pollStatus, 2000);
    return;
  }
  classes = status.classes;
  isFashion = status.dataset === "Fashion-MNIST";
  document.getElementById("network-line").textContent =
    `${status.dataset} network: ${status.spec}`;
  showTraining(status);
  if (status.phase === "training") {
    showView("training-view");
    setTimeout(pollStatus, STATUS_EVERY_MS);
  } else if (!padStarted) {
    padStarted = true;          // phase "ready": the network is trained (or loaded), so draw
    startPad(status);
  }
}

function showView(id) {
  for (const view of ["training-view", "pad-view"]) {
    document.getElementById(view).hidden = view !== id;
  }
}

// 112 -> "1 min 52 s"
function formatSeconds(seconds) {
  const s = Math.max(0, Math.round(seconds));
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function showTraining(status) {
  const left = status.seconds_left === null ? "measuring the speed"
    : `about ${formatSeconds(status.seconds_left)} left`;
  document.getElementById("training-progress").textContent = status.phase === "ready"
    ? `Trained: ${status.epochs} epochs, ${status.steps.toLocaleString("en")} steps.`
    : `Epoch ${status.epoch} of ${status.epochs} · step ${status.step.toLocaleString("en")} of ` +
      `${status.steps.toLocaleString("en")} · ${left}`;
  const done = status.steps > 0 ? status.step / status.steps : 0;
  document.getElementById("progress-bar").style.width = `${(100 * done).toFixed(1)}%`;

  // The x axis spans the whole training, so the curves grow from left to right.
  const stepsPerEpoch = status.steps / Math.max(status.epochs, 1);
  const lastLoss = status.loss.length ? status.loss[status.loss.length - 1][1] : null;
  drawCurves(document.getElementById("loss-curve"), {
    xMax: status.steps,
    yMin: 0,
    yMax: Math.ceil(2 * Math.max(2.5, ...status.loss.map(p => p[1]))) / 2,   // in steps of 0.5
    yStep: 0.5,
    yLabel: v => v.toFixed(1),
    lines: [{ points: status.loss, colour: "#c0392b" }],
    dots: [],
    title: lastLoss === null ? "" : `loss ${lastLoss.toFixed(3)}`,
  });
  const accuracies = status.train_accuracy.map(p => p[1]).concat(status.test_accuracy.map(p => p[1]));
  const lowest = accuracies.length ? Math.min(...accuracies) : 0;
  const lastTest = status.test_accuracy.length
    ? status.test_accuracy[status.test_accuracy.length - 1][1] : null;
  const lastTrain = status.train_accuracy.length
    ? status.train_accuracy[status.train_accuracy.length - 1][1] : null;
  drawCurves(document.getElementById("accuracy-curve"), {
    xMax: status.steps,
    // grid lines every 10% once all of it is above 50% (and from 80% at most), else every 20%
    yMin: lowest >= 0.5 ? Math.min(0.8, Math.floor(lowest * 10) / 10) : Math.floor(lowest * 5) / 5,
    yMax: 1,
    yStep: lowest >= 0.5 ? 0.1 : 0.2,
    yLabel: v => `${Math.round(100 * v)}%`,
    lines: [{ points: status.train_accuracy, colour: "#2c6fbb" }],
    dots: status.test_accuracy.map(([epoch, value]) => [epoch * stepsPerEpoch, value]),
    title: (lastTrain === null ? "" : `train ${(100 * lastTrain).toFixed(1)}%`) +
      (lastTest === null ? "" : `   test ${(100 * lastTest).toFixed(2)}%`),
  });
  if (status.filters) {
    drawFilters(document.getElementById("filters"), status.filters);
  }
}

// A line chart on a canvas: lines of [x, y] points, dots (the test accuracy per epoch), axes
// with a grid line every chart.yStep.
function drawCurves(canvas, chart) {
  const ctx = canvas.getContext("2d");
  const left = 44, right = 12, top = 24, bottom = 26;
  const width = canvas.width - left - right, height = canvas.height - top - bottom;
  const xMax = Math.max(chart.xMax, 1);
  const toX = x => left + width * Math.min(x / xMax, 1);
  const toY = y => top + height * (1 - (y - chart.yMin) / (chart.yMax - chart.yMin));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "12px sans-serif";
  // grid lines and their values
  ctx.strokeStyle = "#e3e3e3";
  ctx.fillStyle = "#666";
  ctx.lineWidth = 1;
  for (let value = chart.yMin; value <= chart.yMax + 1e-9; value += chart.yStep) {
    const y = Math.round(toY(value)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + width, y);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(chart.yLabel(value), left - 6, y + 4);
  }
  ctx.textAlign = "left";
  ctx.fillText("0", left, top + height + 17);
  ctx.textAlign = "right";
  ctx.fillText(`${chart.xMax.toLocaleString("en")} steps`, left + width, top + height + 17);
  ctx.fillStyle = "#222";
  ctx.textAlign = "left";
  ctx.font = "bold 13px sans-serif";
  ctx.fillText(chart.title, left, 15);
  // the curves
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  for (const line of chart.lines) {
    ctx.strokeStyle = line.colour;
    ctx.beginPath();
    line.points.forEach(([x, y], i) => (i ? ctx.lineTo(toX(x), toY(y)) : ctx.moveTo(toX(x), toY(y))));
    ctx.stroke();
  }
  canvas.dataset.points = String(chart.lines.reduce((n, line) => n + line.points.length, 0));
  ctx.fillStyle = "#e67e22";
  for (const [x, y] of chart.dots) {
    ctx.beginPath();
    ctx.arc(toX(x), toY(y), 5, 0, 2 * Math.PI);
    ctx.fill();
  }
}

// The first conv's filters (conv1.weight[f, 0], K x K each), every one scaled to the
// largest |weight| of them all so that they can be compared: red +, blue -, white 0.
function drawFilters(box, filters) {
  const scale = Math.max(1e-9, ...filters.flat(2).map(Math.abs));
  while (box.children.length > filters.length) box.lastChild.remove();
  while (box.children.length < filters.length) box.appendChild(document.createElement("canvas"));
  filters.forEach((filter, f) => {
    const canvas = box.children[f];
    const K = filter.length, cell = Math.max(6, Math.floor(60 / K));
    canvas.width = canvas.height = K * cell;
    canvas.title = `filter ${f}`;
    const ctx = canvas.getContext("2d");
    filter.forEach((row, i) => row.forEach((w, j) => {
      ctx.fillStyle = signedColour(w / scale);
      ctx.fillRect(j * cell, i * cell, cell, cell);
    }));
  });
}

// -1 .. 1 -> blue .. white .. red (matplotlib's RdBu_r in spirit, as --why and --show-maps draw)
function signedColour(v) {
  const t = Math.min(1, Math.abs(v));
  const [r, g, b] = v >= 0 ? [178, 24, 43] : [33, 102, 172];
  const mix = (full) => Math.round(255 + (full - 255) * t);
  return `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
}

// ---------------------------------------------------------------------------------------------
// 3. The pad: a 280x280 canvas, black ink on white paper, a round pen, pointer events
//    (one code path for the mouse, a finger and a pen).
// ---------------------------------------------------------------------------------------------

const pad = document.getElementById("pad");
const padContext = pad.getContext("2d", { willReadFrequently: true });   // read back after every stroke
let strokes = 0;          // strokes since the last clear
let penDown = false;
let lastPoint = null;

function blankPad() {
  padContext.fillStyle = "white";          // paper: 255; the server reads 0 as ink
  padContext.fillRect(0, 0, pad.width, pad.height);
}

// Where the pointer is, in the canvas's own pixels: measured from inside the pad's border
// (clientLeft, clientTop), and scaled in case the page draws the canvas at another size.
function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left - pad.clientLeft) * pad.width / pad.clientWidth,
          (event.clientY - box.top - pad.clientTop) * pad.height / pad.clientHeight];
}

// A dot where the pen touches down (a click alone leaves one, as a real pen does).
function inkDot(point) {
  padContext.fillStyle = "black";
  padContext.beginPath();
  padContext.arc(point[0], point[1], PEN_WIDTH / 2, 0, 2 * Math.PI);
  padContext.fill();
}

// A line from the last point to this one, with round ends so that the pieces join smoothly.
function inkTo(point) {
  padContext.strokeStyle = "black";
  padContext.lineWidth = PEN_WIDTH;
  padContext.lineCap = "round";
  padContext.lineJoin = "round";
  padContext.beginPath();
  padContext.moveTo(...lastPoint);
  padContext.lineTo(...point);
  padContext.stroke();
  lastPoint = point;
}

pad.addEventListener("pointerdown", event => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);    // keep the stroke even if it leaves the pad
  if (source.kind === "test") startDrawingOnTestImage();
  penDown = true;
  lastPoint = padPoint(event);
  inkDot(lastPoint);
});

pad.addEventListener("pointermove", event => {
  if (!penDown) return;
  // a fast pen sends several positions per event: draw them all for a smooth line
  const moves = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const move of (moves.length ? moves : [event])) inkTo(padPoint(move));
});

function endStroke() {
  if (!penDown) return;
  penDown = false;
  strokes += 1;
  whyClass = null;                           // a new drawing: explain its own answer
  askAboutPad();                             // an answer after every stroke, no "Go" button
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

// The pad's pixels as the server wants them: H*W grey levels, row by row, 255 = white paper.
// The canvas is black and white (and the greys of its smooth edges), so red = green = blue.
function padPixels() {
  const rgba = padContext.getImageData(0, 0, pad.width, pad.height).data;
  const grey = new Array(pad.width * pad.height);
  for (let i = 0; i < grey.length; i++) grey[i] = rgba[4 * i];
  return grey;
}

// ---------------------------------------------------------------------------------------------
// 4. Asking for an answer.  What is shown comes from one of two sources: the pad, or a test
//    image (its 28x28 pixels, also painted on the pad).  An answer that arrives after the pad
//    was cleared or changed source is dropped (padVersion); while one question is out, the next
//    stroke waits and then asks once about the pad as it is by then (no pile-up of requests).
// ---------------------------------------------------------------------------------------------

let source = { kind: "pad" };     // or { kind: "test", testIndex, labelName }
let whyClass = null;              // the class the saliency explains (null: the network's answer)
let padVersion = 0;
let asking = false;
let askAgain = false;

async function askAboutPad() {
  if (asking) {
    askAgain = true;
    return;
  }
  asking = true;
  const version = padVersion, strokesIncluded = strokes;
  const question = { pixels: padPixels(), width: pad.width, height: pad.height };
  if (whyClass !== null) question.class = whyClass;
  try {
    const answer = await askServer("/api/predict", question);
    if (version === padVersion) showAnswer(answer, strokesIncluded);
    showError("");
  } catch (e) {
    showError(`The server could not answer: ${e.message}`);
  } finally {
    asking = false;
    if (askAgain) {
      askAgain = false;
      askAboutPad();
    }
  }
}

// "Test digit" and "Show a mistake": a test image from the server, with its label.
async function loadTestImage(path) {
  padVersion += 1;
  askAgain = false;
  const version = padVersion;
  try {
    const answer = await askServer(path);
    if (version !== padVersion) return;
    source = { kind: "test", testIndex: answer.test_index, labelName: answer.label_name };
    whyClass = null;
    strokes = 0;
    paintTestImage(answer.prepared);
    showAnswer(answer, 0);
    showTestInfo(answer);
    showError("");
  } catch (e) {
    showError(e.status === 404 ? "The network gets every test image right: no mistake to show."
      : `The server could not answer: ${e.message}`);
  }
}

function showTestInfo(answer) {
  const verdict = answer.right ? "the network is right" : `the network says ${answer.answer}: wrong`;
  const info = document.getElementById("test-info");
  info.textContent = `Test image ${answer.test_index}, labelled ${answer.label_name}: ${verdict}.`;
  info.className = answer.right ? "note right" : "note wrong";
}

// A test image on the pad, ten times larger and as ink on paper (255 - MNIST's white on black).
function paintTestImage(image) {
  const small = document.createElement("canvas");
  small.width = small.height = 28;
  const smallContext = small.getContext("2d");
  const pixels = smallContext.createImageData(28, 28);
  image.forEach((v, i) => {
    pixels.data.set([255 - v, 255 - v, 255 - v, 255], 4 * i);
  });
  smallContext.putImageData(pixels, 0, 0);
  blankPad();
  padContext.imageSmoothingEnabled = true;
  padContext.drawImage(small, 0, 0, pad.width, pad.height);
}

// Drawing on a test image edits it: from then on the pad is the source.
function startDrawingOnTestImage() {
  padVersion += 1;               // an answer still on its way is for the test image as it was
  const info = document.getElementById("test-info");
  info.textContent = `Your edit of test image ${source.testIndex} (labelled ${source.labelName}).`;
  info.className = "note";
  source = { kind: "pad" };
}

// Clicking a class: the same picture asked again, with the class whose saliency to show
// (a test image by its index, so that the network sees exactly that image again).
async function explainClass(k) {
  whyClass = k;
  if (source.kind === "pad") {
    askAboutPad();
    return;
  }
  const version = padVersion;
  try {
    const answer = await askServer(`/api/test_digit?index=${source.testIndex}&class=${k}`);
    if (version === padVersion) showAnswer(answer, strokes);
  } catch (e) {
    showError(`The server could not answer: ${e.message}`);
  }
}

document.getElementById("clear").addEventListener("click", () => {
  padVersion += 1;               // answers still on their way are for the old drawing
  askAgain = false;
  strokes = 0;
  whyClass = null;
  source = { kind: "pad" };
  blankPad();
  document.getElementById("test-info").textContent = "";
  showAnswer(null, 0);
});
document.getElementById("test-digit").addEventListener("click", () => loadTestImage("/api/test_digit"));
document.getElementById("mistake").addEventListener("click", () => loadTestImage("/api/mistake"));

// ---------------------------------------------------------------------------------------------
// 5. Showing an answer (null: the empty pad)
// ---------------------------------------------------------------------------------------------

function showAnswer(answer, strokesIncluded) {
  const prediction = document.getElementById("prediction");
  prediction.textContent = answer ? answer.answer : "no digit";
  prediction.classList.toggle("long", prediction.textContent.length > 5);    // "Ankle boot"
  prediction.dataset.strokes = String(strokesIncluded);
  const found = answer !== null && answer.index !== null;
  prediction.classList.toggle("nothing", !found);
  showProbabilities(found ? answer : null);
  drawPrepared(found ? answer.prepared : null);
  drawSaliency(found ? answer : null);
  showMaps(found ? answer.maps : []);
}

// Ten bars, one per class: the softmax probabilities.  Each is a button: click it to see
// the saliency of that class (why it is, or why it is not, the answer).
function showProbabilities(answer) {
  const box = document.getElementById("probabilities");
  box.textContent = "";
  classes.forEach((name, k) => {
    const p = answer ? answer.probabilities[k] : 0;
    const row = document.createElement("button");
    row.type = "button";
    row.className = "bar-row";
    row.dataset.class = String(k);
    if (answer && k === answer.index) row.classList.add("answer");
    if (answer && answer.saliency && k === answer.saliency.class) row.classList.add("explained");
    row.title = answer ? `why ${k === answer.index ? "" : "not "}${name}?` : "";
    row.disabled = !answer;
    row.innerHTML = `<span class="bar-name"></span><span class="bar-track"><span class="bar"></span></span>` +
      `<span class="bar-value"></span>`;
    row.querySelector(".bar-name").textContent = name;
    row.querySelector(".bar").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".bar-value").textContent = answer ? `${(100 * p).toFixed(p < 0.1 ? 1 : 0)}%` : "";
    row.addEventListener("click", () => explainClass(k));
    box.appendChild(row);
  });
}

// The 28x28 picture the network reads (MNIST's way: white ink on black), each pixel a square:
// the pad prepared by the server, or a test image as it is in the data set's file.
function drawPrepared(image) {
  document.getElementById("prepared-caption").textContent = source.kind === "test"
    ? `test image ${source.testIndex}, as it is` : "the 28×28 picture";
  const canvas = document.getElementById("prepared");
  const ctx = canvas.getContext("2d");
  const cell = canvas.width / 28;
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!image) return;
  image.forEach((v, i) => {
    ctx.fillStyle = `rgb(${v}, ${v}, ${v})`;
    ctx.fillRect((i % 28) * cell, Math.floor(i / 28) * cell, cell, cell);
  });
}

// The saliency: d score[class] / d pixel for the 784 input pixels, computed by the server as
// tools/maps_and_saliency.saliency does: a forward pass, then the network's backward pass
// (Network.backward, section 3) seeded with 1 for that class's score, down to the input.
// Red: more ink there raises the score; blue: lowers it; scaled to the largest |gradient|.
// The black line goes round the ink (prepared pixels of 128 or more), as --why outlines it.
function drawSaliency(answer) {
  const canvas = document.getElementById("saliency");
  const caption = document.getElementById("saliency-caption");
  const ctx = canvas.getContext("2d");
  const cell = canvas.width / 28;
  ctx.fillStyle = "white";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!answer || !answer.saliency) {
    caption.textContent = "why?";
    return;
  }
  const { gradient, class: k, name } = answer.saliency;
  const scale = Math.max(1e-12, ...gradient.map(Math.abs));
  gradient.forEach((g, i) => {
    ctx.fillStyle = signedColour(g / scale);
    ctx.fillRect((i % 28) * cell, Math.floor(i / 28) * cell, cell, cell);
  });
  // the ink's outline: an edge wherever an ink pixel meets a pixel that is not ink
  const ink = (row, col) => row >= 0 && row < 28 && col >= 0 && col < 28 &&
    answer.prepared[28 * row + col] >= 128;
  ctx.strokeStyle = "black";
  ctx.lineWidth = 2;
  ctx.beginPath();
  for (let row = 0; row < 28; row++) {
    for (let col = 0; col < 28; col++) {
      if (!ink(row, col)) continue;
      const x = col * cell, y = row * cell;
      if (!ink(row - 1, col)) { ctx.moveTo(x, y); ctx.lineTo(x + cell, y); }
      if (!ink(row + 1, col)) { ctx.moveTo(x, y + cell); ctx.lineTo(x + cell, y + cell); }
      if (!ink(row, col - 1)) { ctx.moveTo(x, y); ctx.lineTo(x, y + cell); }
      if (!ink(row, col + 1)) { ctx.moveTo(x + cell, y); ctx.lineTo(x + cell, y + cell); }
    }
  }
  ctx.stroke();
  const p = (100 * answer.probabilities[k]).toFixed(1);
  caption.textContent = k === answer.index ? `why ${name}? (p = ${p}%)` : `why not ${name}? (p = ${p}%)`;
}

// The output of every layer, in order, as tools/maps_and_saliency.layer_outputs walks the
// chapter's layers (each one's forward, section 2): maps for conv, batch norm, ReLU, pool and
// dropout; a row of bars for a dense layer (the last one's bars are the ten scores).
function showMaps(layers) {
  const box = document.getElementById("maps");
  box.textContent = "";
  if (!layers.length) {
    box.innerHTML = '<p class="note">Draw a digit, or load a test image, to see them.</p>';
    return;
  }
  layers.forEach((layer, i) => {
    const row = document.createElement("div");
    row.className = "layer";
    const title = document.createElement("div");
    title.className = "layer-title";
    title.textContent = `${layer.label} → ${layer.shape.join("×")}`;
    row.appendChild(title);
    const pictures = document.createElement("div");
    pictures.className = "layer-maps";
    if (layer.maps) {
      // which channels these are: the most active ones, the same from a conv down to the next
      const channels = layer.channels || layer.maps.map((map, c) => c);
      layer.maps.forEach((map, i) => {
        const figure = document.createElement("figure");
        figure.className = "map";
        figure.appendChild(mapCanvas(map, channels[i]));
        const number = document.createElement("figcaption");
        number.textContent = channels[i];
        figure.appendChild(number);
        pictures.appendChild(figure);
      });
      if (layer.maps.length < layer.shape[0]) {
        const more = document.createElement("span");
        more.className = "note";
        more.textContent = `the ${layer.maps.length} most active of ${layer.shape[0]} maps`;
        pictures.appendChild(more);
      }
    } else if (layer.label.startsWith("flatten")) {
      pictures.innerHTML = '<span class="note">the maps above in one row of numbers, ' +
        "in (channel, row, column) order</span>";
    } else if (layer.values) {
      const last = i === layers.length - 1;
      pictures.appendChild(unitsCanvas(layer.values, last));
    }
    row.appendChild(pictures);
    box.appendChild(row);
  });
}

// One map (rows of numbers) on its own scale: all >= 0 -> white (0) to black (its highest);
// with negatives -> blue, white 0, red, symmetric.
function mapCanvas(map, channel) {
  const H = map.length, W = map[0].length;
  const cell = Math.max(1, Math.round(MAPS_SIDE / W));
  const canvas = document.createElement("canvas");
  canvas.width = W * cell;
  canvas.height = H * cell;
  canvas.title = `map ${channel}`;
  const values = map.flat();
  const low = Math.min(...values), high = Math.max(...values);
  const signed = low < 0;
  const scale = signed ? Math.max(-low, high) : high;
  const ctx = canvas.getContext("2d");
  map.forEach((rowValues, y) => rowValues.forEach((v, x) => {
    if (signed) {
      ctx.fillStyle = signedColour(scale > 0 ? v / scale : 0);
    } else {
      const level = Math.round(255 * (1 - (scale > 0 ? v / scale : 0)));
      ctx.fillStyle = `rgb(${level}, ${level}, ${level})`;
    }
    ctx.fillRect(x * cell, y * cell, cell, cell);
  }));
  return canvas;
}

// A dense layer's units as bars from a zero line.  The last layer: the ten scores (logits),
// labelled with the class names, the highest in red.
function unitsCanvas(values, last) {
  const canvas = document.createElement("canvas");
  const named = last && classes.some(name => name.length > 1);      // Fashion-MNIST's names
  const barWidth = last ? (named ? 64 : 44) : Math.max(2, Math.min(6, Math.floor(640 / values.length)));
  const labels = last ? 18 : 0;
  canvas.width = values.length * barWidth;
  canvas.height = 80 + labels;
  const ctx = canvas.getContext("2d");
  const scale = Math.max(1e-9, ...values.map(Math.abs));
  const high = Math.max(0, ...values), low = Math.min(0, ...values);
  const span = 72, zero = 4 + span * high / Math.max(high - low, 1e-9);
  const best = values.indexOf(Math.max(...values));
  values.forEach((v, k) => {
    const length = span * Math.abs(v) / Math.max(high - low, scale, 1e-9);
    ctx.fillStyle = last ? (k === best ? "#c0392b" : "#999") : (v > 0 ? "#2c6fbb" : "#bbb");
    const gap = last ? 8 : (barWidth > 2 ? 1 : 0);
    ctx.fillRect(k * barWidth + gap / 2, v >= 0 ? zero - length : zero, barWidth - gap, Math.max(length, 1));
  });
  ctx.fillStyle = "#333";
  ctx.fillRect(0, zero, canvas.width, 1);
  if (last) {
    ctx.font = "11px sans-serif";
    ctx.textAlign = "center";
    values.forEach((v, k) => {
      const name = classes[k].length > 10 ? classes[k].slice(0, 9) + "…" : classes[k];
      ctx.fillText(name, k * barWidth + barWidth / 2, canvas.height - 4);
    });
  }
  canvas.title = last ? "the ten scores (logits)" : `${values.length} units`;
  return canvas;
}

// ---------------------------------------------------------------------------------------------
// 6. Starting: the pad view once the network is ready
// ---------------------------------------------------------------------------------------------

function startPad(status) {
  showView("pad-view");
  // The curves stay one click away (a loaded model has none)
  const switchView = document.getElementById("switch-view");
  switchView.hidden = status.loss.length === 0;
  switchView.addEventListener("click", () => {
    const toTraining = !document.getElementById("pad-view").hidden;
    showView(toTraining ? "training-view" : "pad-view");
    switchView.textContent = toTraining ? "Back to the pad" : "See the training";
  });
  if (isFashion) {
    // Fashion-MNIST: photos of clothes. Drawing one is hard; the test pictures are the way in.
    document.getElementById("pad-title").textContent = "Pick a test picture";
    document.getElementById("test-digit").textContent = "Test picture";
    document.getElementById("pad-hint").textContent = "Fashion-MNIST: the network knows ten kinds " +
      "of clothes. Load a test picture, or draw one (a trouser, a bag) and see what it makes of it.";
    document.querySelector(".buttons").prepend(document.getElementById("test-digit"));
    document.getElementById("preparation-note").innerHTML = "Left: the picture the network reads: " +
      "a test picture as it is, or your drawing prepared like Fashion-MNIST (trimmed to the " +
      "garment, scaled to 28 pixels, centred: <code>tools/own_digits.fashion_like</code>, as " +
      "<code>--predict</code> does). <code>to_input</code> (section 1) then scales its pixels.";
    loadTestImage("/api/test_digit");
  }
}

blankPad();
showAnswer(null, 0);
pollStatus();
