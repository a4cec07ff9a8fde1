"""The page (--serve): draw a digit and watch the network answer, or watch it learn first.

    python3 mnist_net.py --serve                         # trains the default network, page already up
    python3 mnist_net.py --serve --load-model m.npz      # serves a saved network at once

Python's standard library (http.server) and NumPy only.  The page itself is three files of
its own in tools/page/ (index.html, page.js, page.css); everything else is JSON (docs/page.md):

    GET  /api/status       the training so far (curves, first-layer filters) or "ready"
    POST /api/predict      the pad's pixels -> the answer, the 28x28 picture the network sees,
                           the probabilities, the maps after every layer and the saliency
    GET  /api/test_digit   the same for a random test image, with its label
    GET  /api/mistake      the same for a random test image the network gets wrong

The pad is prepared by the code --predict uses (tools/own_digits.py); the maps and the
saliency come from tools/maps_and_saliency.py, on a copy of the network made of the chapter's
layers.  Those layers keep what their backward needs on themselves, so one request at a time
uses that copy (a lock); requests are otherwise served on threads of their own.
"""
import http
import http.server
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np

import mnist_net
from tools import fetch_data, own_digits
from tools.maps_and_saliency import layer_outputs, map_stretches, saliency, softmax
from tools.model_files import chapter_copy, load_model, save_model

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")
# the only files served, by their exact path: nothing a request writes is ever joined to a folder
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/page.js": ("page.js", "text/javascript; charset=utf-8"),
         "/page.css": ("page.css", "text/css; charset=utf-8")}
MAX_BODY = 1 << 20         # 1 MB: a 280x280 pad is at most 314 KB of JSON
SIDES = (28, 1000)         # a picture's width and height, each
PAD_SIDE = 280             # the page's drawing pad, ten times MNIST's side
MAPS_PER_LAYER = 8         # maps sent for each layer (the most active ones)
POINT_EVERY = 0.5          # seconds of training between two points of the curves
DIGITS = 4                 # significant digits of the floats sent (of each map's largest)
LOCAL = ("127.0.0.1", "localhost", "::1")


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and one line saying why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Stopped(Exception):
    """Raised inside the training when Ctrl-C stops the server."""


def one_line(text, limit=200):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def rounded(a, digits=DIGITS):
    """a as float64 rounded to `digits` significant digits of its largest value (short JSON)."""
    a = np.asarray(a, np.float64)
    top = float(np.abs(a).max()) if a.size else 0.0
    if not math.isfinite(top):
        raise ValueError("the network computed a value that is not finite")
    return a if top == 0 else np.round(a, digits - 1 - math.floor(math.log10(top)))


# --- what the page shows ----------------------------------------------------------------------
class Page:
    """What the server knows and computes, HTTP aside: the data set, the network once it is ready
    (a copy of the chapter's layers, used under self.lock), the test images, the training so far."""

    def __init__(self, dataset, spec, test=None, no_test_reason="", epochs=0, steps=0):
        self.dataset, self.spec = dataset, spec
        self.test, self.no_test_reason = test, no_test_reason
        self.prepare = own_digits.fashion_like if dataset.key == "fashion" else own_digits.mnist_like
        self.twin = None                              # set by ready()
        self.lock = threading.Lock()                  # the twin's layers keep their caches on themselves
        self.progress = threading.Lock()              # the curves, written by the training thread
        self.rng = np.random.default_rng()
        self.predicted = None if test is None else np.full(len(test[1]), -1, np.int16)
        self.epoch, self.epochs, self.step, self.steps = 0, epochs, 0, steps
        self.seconds_left = None
        self.loss, self.train_accuracy, self.test_accuracy = [], [], []
        self.training_net = None                      # the network being trained, for its filters

    def ready(self, net):
        """Serve `net` from now on (its parameters copied into the chapter's layers)."""
        twin = chapter_copy(net)
        # one stroke through it all now: the first answer a learner waits for is as quick as the next
        stroke = np.full((PAD_SIDE, PAD_SIDE), 255.0)
        stroke[60:220, 130:150] = 0
        try:
            self.look(twin, self.prepare(stroke))
        except own_digits.ImageError:
            pass
        with self.progress:
            self.twin, self.seconds_left = twin, None

    # -- GET /api/status
    def status(self):
        with self.progress:
            net = self.twin if self.twin is not None else self.training_net
            weight = None if net is None else net.state.get("conv1.weight")
            return {"phase": "ready" if self.twin is not None else "training", "spec": self.spec,
                    "dataset": self.dataset.title, "classes": list(self.dataset.classes),
                    "epoch": self.epoch, "epochs": self.epochs, "step": self.step, "steps": self.steps,
                    "seconds_left": self.seconds_left, "loss": list(self.loss),
                    "train_accuracy": list(self.train_accuracy),
                    "test_accuracy": list(self.test_accuracy),
                    # the first input channel of each first-layer filter (the only one, for images)
                    "filters": None if weight is None else [rounded(w).tolist() for w in weight[:, 0]]}

    # -- POST /api/predict
    def predict(self, body):
        twin = self.network()
        grey, klass = picture_of(body)
        try:
            image = self.prepare(grey)
        except own_digits.ImageError:                 # a blank pad, or nothing that stands out
            return {"answer": "no digit", "index": None, "probabilities": [0.0] * len(self.dataset.classes),
                    "prepared": [0] * 784, "maps": [], "saliency": None}
        return self.look(twin, image, klass)

    # -- GET /api/test_digit and /api/mistake
    def test_digit(self, query, mistake=False):
        klass = whole_in_query(query, "class", len(self.dataset.classes))
        twin = self.network()
        if self.test is None:
            raise BadRequest(503, f"no test images: {self.no_test_reason}")
        images, labels = self.test
        if mistake:
            i = self.random_mistake(twin)
            if i is None:
                raise BadRequest(404, f"the network gets every one of the {len(labels)} test images right")
        else:
            i = whole_in_query(query, "index", len(labels))
            if i is None:
                with self.lock:
                    i = int(self.rng.integers(len(labels)))
        answer = self.look(twin, images[i], klass)
        label = int(labels[i])
        answer.update(label=label, label_name=self.dataset.classes[label], right=answer["index"] == label,
                      test_index=i)
        return answer

    def network(self):
        twin = self.twin
        if twin is None:
            raise BadRequest(503, "still training")
        return twin

    def random_mistake(self, twin, batch=256):
        """The index of a random test image the network gets wrong, or None.  The test images are
        walked in a random order, classified a batch at a time (each once, then remembered), up to
        the first mistake: every mistake is as likely to come first as any other."""
        images, labels = self.test
        with self.lock:
            order = self.rng.permutation(len(labels))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            new = idx[self.predicted[idx] < 0]
            if len(new):
                x = mnist_net.to_input(images[new], twin.mean, twin.std)
                with self.lock:
                    self.predicted[new] = twin.forward(x, train=False).argmax(axis=1)
            wrong = idx[self.predicted[idx] != labels[idx]]
            if len(wrong):
                return int(wrong[0])
        return None

    def look(self, twin, image, klass=None):
        """The answer for a 28x28 uint8 image (white on black, as MNIST): probabilities, maps after
        every layer and the saliency of class `klass` (the answer's if None)."""
        x = mnist_net.to_input(image[None], twin.mean, twin.std)
        with self.lock:
            outputs = layer_outputs(twin, x)               # [(token, layer, output for the image)]
            logits = outputs[-1][2].astype(np.float64)
            best = int(np.argmax(logits))
            k = best if klass is None else klass
            gradient = saliency(twin, x, np.array([k]))[0]   # d logit[k] / d pixel, (28, 28)
        names = {id(layer): prefix for prefix, layer in twin.named}
        maps = []
        for (token, layer, out), channels in zip(outputs, channels_shown(outputs)):
            entry = {"label": token + (f" ({names[id(layer)]})" if id(layer) in names else ""),
                     "shape": list(out.shape)}
            if out.ndim == 3:
                entry.update(channels=channels, maps=[rounded(out[c]).tolist() for c in channels])
            else:
                entry["values"] = rounded(out).tolist()
            maps.append(entry)
        classes = self.dataset.classes
        return {"answer": classes[best], "index": best,
                "probabilities": np.round(softmax(logits), 6).tolist(),
                "prepared": image.astype(int).ravel().tolist(), "maps": maps,
                "saliency": {"class": k, "name": classes[k], "gradient": rounded(gradient).ravel().tolist()}}


def channels_shown(outputs, count=MAPS_PER_LAYER):
    """For each layer's output, the channels sent (None for a vector): as --show-maps chooses them
    (maps_and_saliency.maps_shown), the same ones from a conv down to the next conv, so a map can be
    followed through its batch norm, ReLU and pool: the `count` most active (largest mean |value|)
    in the last map of that stretch, in channel order."""
    stretches = map_stretches(outputs)
    shown = [None] * len(outputs)
    for stretch in stretches:
        activity = np.abs(outputs[stretch[-1]][2].astype(np.float64)).mean(axis=(1, 2))
        chosen = sorted(int(c) for c in np.argsort(-activity, kind="stable")[:count])
        for i in stretch:
            shown[i] = chosen
    return shown


# --- checking a request -----------------------------------------------------------------------
def whole(name, value, low, high):
    """value, a JSON whole number from low to high (not a bool, not 3.0); else BadRequest."""
    if type(value) is not int:
        shown = json.dumps(value) if isinstance(value, (bool, type(None))) else repr(value)
        raise BadRequest(400, f"{name} must be a whole number from {low} to {high}, not {one_line(shown, 40)}")
    if not low <= value <= high:
        raise BadRequest(400, f"{name} must be from {low} to {high}, not {value}")
    return value


def whole_in_query(query, name, end):
    """?name=K from a query string, K from 0 to end - 1, or None when absent."""
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get(name)
    if not values:
        return None
    text = values[0]
    if not text.isascii() or not text.isdigit():
        raise BadRequest(400, f"?{name}= must be a whole number from 0 to {end - 1}, not {one_line(text, 40)!r}")
    return whole(f"?{name}=", int(text), 0, end - 1)


def picture_of(body):
    """The JSON of POST /api/predict -> (grey picture (H, W) float64, 255 = paper, class or None)."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object {\"pixels\": [...], \"width\": W, \"height\": H}")
    for name in ("pixels", "width", "height"):
        if name not in body:
            raise BadRequest(400, f"missing field {name!r}")
    width = whole("width", body["width"], *SIDES)
    height = whole("height", body["height"], *SIDES)
    klass = body.get("class")
    if klass is not None:
        klass = whole("class", klass, 0, mnist_net.CLASSES - 1)
    pixels = body["pixels"]
    if not isinstance(pixels, list):
        raise BadRequest(400, "pixels must be a list of grey levels 0-255, row by row")
    if len(pixels) != width * height:
        raise BadRequest(400, f"pixels holds {len(pixels)} values, width x height is {width * height}")
    if set(map(type, pixels)) != {int}:              # one pass in C; bool and float are not int
        i, bad = next((i, v) for i, v in enumerate(pixels) if type(v) is not int)
        raise BadRequest(400, f"pixels[{i}] is {one_line(json.dumps(bad), 40)}: each pixel must be a "
                              "whole number from 0 to 255")
    try:
        grey = np.array(pixels, np.int64)
    except OverflowError:
        grey = None
    if grey is None or grey.min() < 0 or grey.max() > 255:
        i = next(i for i, v in enumerate(pixels) if not 0 <= v <= 255)
        raise BadRequest(400, f"pixels[{i}] is {one_line(pixels[i], 40)}: each pixel must be from 0 to 255")
    return grey.reshape(height, width).astype(np.float64), klass


def refuse_constant(name):
    raise BadRequest(400, f"malformed JSON: {name} is not a number JSON allows")


# --- HTTP ---------------------------------------------------------------------------------------
class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "mnist_net-page"
    timeout = 30                        # seconds a client may take to send its request

    def log_message(self, format, *args):
        pass                            # the page polls twice a second: no line per request

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, an unknown method) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":      # a request line it could not read: answer in HTTP/1.0
            self.request_version = "HTTP/1.0"
        self.reply(code, {"error": one_line(message or http.HTTPStatus(code).phrase)})

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        t0 = time.perf_counter()
        page = self.server.page
        try:
            parts = urllib.parse.urlsplit(self.path)
            path, query = parts.path, parts.query
            if path in FILES:
                if method != "GET":
                    raise BadRequest(405, f"{path} is a file of the page: GET it")
                return self.send_file(*FILES[path])
            api = {"/api/status": ("GET", lambda: page.status()),
                   "/api/predict": ("POST", lambda: page.predict(self.json_body())),
                   "/api/test_digit": ("GET", lambda: page.test_digit(query)),
                   "/api/mistake": ("GET", lambda: page.test_digit(query, mistake=True))}
            if path not in api:
                raise BadRequest(404, f"no such page: {one_line(path, 80)}")
            wanted, answer = api[path]
            if method != wanted:
                raise BadRequest(405, f"{path} answers {wanted} only")
            result = answer()
            text = json.dumps(result, separators=(",", ":"), allow_nan=False)
            if path != "/api/status":       # the time spent here, reading and encoding included
                text = text[:-1] + f',"ms":{1000 * (time.perf_counter() - t0):.1f}}}'
            self.send(200, text.encode(), "application/json")
        except BadRequest as e:
            self.reply(e.status, {"error": str(e)})
        except (TimeoutError, socket.timeout, ConnectionError):
            self.close_connection = True
        except Exception as e:              # a bug must not stop the server: one line, and a 500
            line = one_line(f"{type(e).__name__}: {e}", 60)
            print(f"page: {method} {one_line(self.path, 20)}: {line}", file=sys.stderr, flush=True)
            self.reply(500, {"error": f"the server failed: {line}"})

    def json_body(self):
        """The request's body as JSON, after checking its size (before reading it)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise BadRequest(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise BadRequest(411, "a POST needs a Content-Length header")
        if not (length.strip().isascii() and length.strip().isdigit()):
            self.close_connection = True
            raise BadRequest(400, f"Content-Length {one_line(length, 40)!r} is not a number of bytes")
        length = int(length)
        if length > MAX_BODY:
            self.close_connection = True    # the body is left unread
            raise BadRequest(413, f"the body is {length:,} bytes, over the limit of 1 MB ({MAX_BODY:,})")
        try:
            data = self.rfile.read(length)
        except (TimeoutError, socket.timeout):       # socket.timeout: Python 3.9
            self.close_connection = True
            raise BadRequest(408, "the body did not arrive in time") from None
        if len(data) < length:
            self.close_connection = True
            raise BadRequest(400, f"the body ended after {len(data)} of its {length} bytes")
        try:
            return json.loads(data, parse_constant=refuse_constant)
        except (ValueError, RecursionError) as e:
            raise BadRequest(400, f"malformed JSON: {one_line(e, 80)}") from None

    def send_file(self, name, content_type):
        try:
            with open(os.path.join(self.server.page_dir, name), "rb") as f:
                data = f.read()
        except OSError:
            raise BadRequest(404, f"{name} is missing from the page's folder") from None
        self.send(200, data, content_type)

    def reply(self, status, obj):
        self.send(status, json.dumps(obj).encode(), "application/json")

    def send(self, status, data, content_type):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (ConnectionError, TimeoutError, socket.timeout):    # the client went away: nothing to tell it
            self.close_connection = True


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True               # a slow client never keeps the program from stopping

    def __init__(self, address, page, page_dir=PAGE_DIR):
        self.page, self.page_dir = page, page_dir
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        """A connection that failed outside a request's own handling: one line, no traceback."""
        e = sys.exc_info()[1]
        if not isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
            print(f"page: a connection from {client_address[0]} failed: {one_line(repr(e), 50)}",
                  file=sys.stderr, flush=True)


class Server6(Server):
    address_family = socket.AF_INET6


def make_server(page, host="127.0.0.1", port=0, page_dir=PAGE_DIR):
    """A Server for `page` listening on host:port (port 0: any free one); OSError if it cannot."""
    return (Server6 if ":" in host else Server)((host, port), page, page_dir)


def url_of(server, host):
    port = server.server_address[1]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


# --- training while the page is up -------------------------------------------------------------
class Watch:
    """The curves of a training run, measured from the network's own calls: each training step's
    forward gives the logits and its backward the gradient of the loss w.r.t. them, (p - onehot(y)) / N,
    from which the batch's labels follow; the evaluation after each epoch gives the test accuracy.
    A point (mean loss and accuracy of the steps since the last point) every POINT_EVERY seconds."""

    def __init__(self, page, steps_per_epoch, test_labels, stop):
        self.page, self.per_epoch, self.test_labels, self.stop = page, steps_per_epoch, test_labels, stop
        self.loss_sum = self.correct = self.seen = self.eval_seen = self.eval_correct = 0
        self.t0 = self.last_point = None

    def network(self, base):
        """base (the chapter's Network or the fast path's) with the watch's hooks."""
        watch = self

        class Watched(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                with watch.page.progress:
                    watch.page.training_net = self

            def forward(self, x, train=True):
                if watch.stop.is_set():
                    raise Stopped()
                logits = super().forward(x, train)
                if train:
                    self.watched_logits = logits
                else:
                    watch.evaluated(logits)
                return logits

            def backward(self, dlogits, input_grad=False):
                watch.stepped(self.watched_logits, dlogits)
                return super().backward(dlogits, input_grad)

        return Watched

    def stepped(self, logits, dlogits):
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = self.last_point = now
        logits = logits.astype(np.float64)
        n = len(logits)
        log_p = mnist_net.log_softmax(logits)
        y = np.argmax(np.exp(log_p) - n * dlogits, axis=1)       # onehot(y) = p - N * dlogits
        self.loss_sum -= log_p[np.arange(n), y].sum()
        self.correct += int((logits.argmax(axis=1) == y).sum())
        self.seen += n
        page = self.page
        with page.progress:
            page.step += 1
            page.epoch = (page.step - 1) // self.per_epoch + 1
            page.seconds_left = (now - self.t0) / page.step * (page.steps - page.step)
            if now - self.last_point >= POINT_EVERY or page.step in (1, page.steps):
                loss = self.loss_sum / self.seen
                if math.isfinite(loss):          # a loss that blew up stops the training instead
                    page.loss.append([page.step, round(loss, 5)])
                    page.train_accuracy.append([page.step, round(self.correct / self.seen, 5)])
                self.loss_sum = self.correct = self.seen = 0
                self.last_point = now

    def evaluated(self, logits):
        labels = self.test_labels[self.eval_seen:self.eval_seen + len(logits)]
        self.eval_correct += int((logits.argmax(axis=1) == labels).sum())
        self.eval_seen += len(logits)
        if self.eval_seen >= len(self.test_labels):
            with self.page.progress:
                self.page.test_accuracy.append([self.page.step // self.per_epoch,
                                                round(self.eval_correct / self.eval_seen, 5)])
            self.eval_seen = self.eval_correct = 0


def train_in_background(page, args, data, network, optimizer, server, out):
    """Start the training thread: train() with a watched network; when done, the page serves it
    (and --save-model saves it).  A failure is one line and stops the server.  Returns
    (thread, stop event, outcome: a dict with "code" when the training failed)."""
    stop, outcome = threading.Event(), {}
    n = min(args.limit or len(data[0]), len(data[0]))
    watch = Watch(page, math.ceil(n / args.batch_size), data[3], stop)

    def run():
        try:
            net, _, (accuracy, _, _) = mnist_net.train(args, data, out, watch.network(network), optimizer)
            if args.save_model:
                config = (f"epochs={args.epochs} batch_size={args.batch_size} optimizer={args.optimizer} "
                          f"lr={args.lr} seed={args.seed} limit={args.limit} net=\"{args.net}\" (--serve)")
                save_model(args.save_model, net, config, page.dataset.key)
                out(f"Saved the model to {args.save_model}")
            page.ready(net)
            out(f"Trained: test accuracy {100 * accuracy:.2f}%; the page now shows the drawing pad")
        except Stopped:
            return
        except mnist_net.NonFiniteLoss as e:
            print(f"error: {e}; lower the learning rate (--lr, --sgd-lr)", file=sys.stderr)
            outcome["code"] = 1
        except Exception as e:
            print(f"error: the training failed: {one_line(f'{type(e).__name__}: {e}', 60)}", file=sys.stderr)
            outcome["code"] = 1
        if "code" in outcome:
            server.shutdown()               # nothing to serve: serve_forever returns
        sys.stdout.flush()

    thread = threading.Thread(target=run, name="training", daemon=True)
    thread.start()
    return thread, stop, outcome


# --- python3 mnist_net.py --serve ----------------------------------------------------------------
def page_of(args, out=print):
    """(Page, training data or None): a loaded model ready at once with its test images, or the
    data set the run trains on.  Errors as the rest of the command line raises them."""
    from tools.command_line import data_set_of_run, fetch_missing_files
    dataset = data_set_of_run(args)
    data_dir = args.data_dir or dataset.folder
    if args.load_model:
        net = load_model(args.load_model)
        try:
            if not args.no_download:
                fetch_missing_files(data_dir, dataset.key)
            test, reason = mnist_net.load_split(data_dir, "test", dataset.title), ""
        except (mnist_net.DataError, fetch_data.FetchError, OSError) as e:
            test, reason = None, one_line(e, 70)
            print(f"warning: no test images ({reason})", file=sys.stderr)
        page = Page(dataset, net.spec, test, reason)
        page.ready(net)
        return page, None
    if not args.no_download:
        fetch_missing_files(data_dir, dataset.key)
    data = mnist_net.load_mnist(data_dir, dataset.title)
    n = min(args.limit or len(data[0]), len(data[0]))
    page = Page(dataset, args.net, data[2:], epochs=args.epochs,
                steps=math.ceil(n / args.batch_size) * args.epochs)
    return page, data


def serve(args, out=print):
    """--serve: the page at http://HOST:PORT/ until Ctrl-C.  Returns the exit code."""
    try:
        page, data = page_of(args, out)
    except KeyboardInterrupt:                   # while the data or the model loads
        out("Stopped.")
        return 130
    host, port = args.host or "127.0.0.1", 8000 if args.port is None else args.port
    try:
        server = make_server(page, host, port)
    except OSError as e:
        import errno
        if e.errno == errno.EADDRINUSE:
            print(f"error: --port {port}: the port is in use; pick another, or --port 0 for any free one",
                  file=sys.stderr)
        else:
            print(f"error: --host {host} --port {port}: cannot listen there ({one_line(e.strerror or e, 40)})",
                  file=sys.stderr)
        return 2
    if host not in LOCAL:
        print(f"warning: --host {host}: the page is reachable from other machines", file=sys.stderr)
    out(f"Serving the page at {url_of(server, host)}")
    if not args.quiet:
        out("Training first; the page shows it as it goes. Ctrl-C stops it." if data else
            f"The network of {os.path.basename(args.load_model)}, trained on {page.dataset.title}. "
            "Ctrl-C stops it.")
    sys.stdout.flush()
    training = outcome = None
    try:
        if data is not None:
            network, optimizer = mnist_net.choose_layers(args, out)
            training, stop, outcome = train_in_background(page, args, data, network, optimizer, server, out)
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        try:
            if training is not None:
                stop.set()
                training.join(timeout=10)
            server.server_close()
        except KeyboardInterrupt:
            pass                             # a second Ctrl-C: leave at once
        out("Stopped.")
        return 130
    server.server_close()
    return outcome.get("code", 0) if outcome else 0
