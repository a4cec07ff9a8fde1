"""The page's server (tools/page_server.py, --serve) over real HTTP, without a browser: every
endpoint against the tools it reuses (own_digits, maps_and_saliency), every bad request (its
status and one line), paths that try to leave the page's folder, concurrent requests, the
curves growing while --serve trains, Ctrl-C, and the preparation's connected parts in NumPy."""
import collections
import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import mnist_net as m
from conftest import ROOT, write_mnist
from drawn_digits import draw_digit
from tools import command_line as cl
from tools import own_digits, page_server
from tools.maps_and_saliency import layer_outputs, saliency
from tools.model_files import chapter_copy
from tools.model_files import load_model

PAD = 280
REAL_DATA = all(m.find_idx_file(m.DATA_DIR, name) for name in m.IDX_NAMES.values())


def quietly(*argv):
    with contextlib.redirect_stdout(io.StringIO()):
        return m.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small seed and deep networks trained here (on real MNIST when it is present, else on the
    synthetic set), the data folder, and a Fashion-MNIST model on a synthetic set."""
    folder = tmp_path_factory.mktemp("models")
    data = m.DATA_DIR if REAL_DATA else str(folder / "data")
    if not REAL_DATA:
        write_mnist(data, n_train=400, n_test=300)
    log = folder / "log.txt"
    made = {"data": data, "folder": folder}
    for name, net, limit in (("seed", "seed", 3000), ("deep", "deep", 600)):
        made[name] = str(folder / f"{name}.npz")
        assert quietly("--data-dir", data, "--net", net, "--epochs", 1, "--limit", limit, "--no-download",
                       "--save-model", made[name], "--log-file", log, "--quiet") == 0
    made["fashion_data"] = str(folder / "fashion")
    write_mnist(made["fashion_data"], n_train=200, n_test=60, seed=3)
    made["fashion"] = str(folder / "fashion.npz")
    assert quietly("--dataset", "fashion", "--data-dir", made["fashion_data"], "--net", "conv4 relu pool fc10",
                   "--epochs", 1, "--no-download", "--save-model", made["fashion"], "--log-file", log,
                   "--quiet") == 0
    return made


Site = collections.namedtuple("Site", "port page server folder net test")


def start_site(page, folder):
    """The server for `page` on a free port of 127.0.0.1, in a thread, its page files in folder/page
    and a secret beside them that no request may read."""
    page_dir = folder / "page"
    page_dir.mkdir(exist_ok=True)
    for name, text in (("index.html", "<!doctype html><title>pad</title>"), ("page.js", "// the page"),
                       ("page.css", "/* the looks */")):
        (page_dir / name).write_text(text)
    (folder / "secret.txt").write_text("SECRET")
    server = page_server.make_server(page, "127.0.0.1", 0, str(page_dir))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def site(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    args = cl.parse_args(["--serve", "--load-model", models["seed"], "--data-dir", models["data"],
                          "--no-download", "--quiet"])
    page, data = page_server.page_of(args)
    assert data is None and page.twin is not None
    server = start_site(page, folder)
    yield Site(server.server_address[1], page, server, folder, load_model(models["seed"]), page.test)
    server.shutdown()
    server.server_close()


def call(port, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def api(port, method, path, obj=None, raw=None):
    """(status, JSON answer); obj is sent as JSON, raw as given."""
    body = raw if raw is not None else (None if obj is None else json.dumps(obj).encode())
    status, headers, data = call(port, method, path, body, {"Content-Type": "application/json"} if body else {})
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(data)


def raw_request(port, data, shut=False, timeout=10):
    """Send bytes as they are; the server's whole answer (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parsed(answer):
    """(status, JSON) of a raw HTTP answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def one_line_error(obj):
    assert set(obj) == {"error"} and isinstance(obj["error"], str)
    assert obj["error"] and "\n" not in obj["error"] and len(obj["error"]) <= 200
    return obj["error"]


def pad(digit, rng, **kw):
    """A digit drawn on the pad as the page sends it: black ink (0) on white (255), a round pen
    a fifteenth of the pad wide."""
    options = dict(canvas=(PAD, PAD), height=200, pen=PAD / 15, ink=0, paper=255, grain=0, slant=0.1)
    options.update(kw)
    return draw_digit(digit, rng, **options)


def body_of(picture, **extra):
    return dict(pixels=picture.astype(int).ravel().tolist(), width=picture.shape[1], height=picture.shape[0],
                **extra)


def expected_answer(net, image, klass=None):
    """What the answer must hold for a prepared 28x28 image, from the tools themselves."""
    twin = chapter_copy(net)
    x = m.to_input(image[None], net.mean, net.std)
    outputs = layer_outputs(twin, x)
    p = m.predict_proba(net, image[None])[0]
    k = int(np.argmax(p)) if klass is None else klass
    return twin, outputs, p, saliency(twin, x, np.array([k]))[0], k


def check_answer(answer, net, image, classes, klass=None):
    """answer (JSON) is right for `image` (28x28 uint8) as the network sees it."""
    twin, outputs, p, gradient, k = expected_answer(net, image, klass)
    assert answer["prepared"] == image.astype(int).ravel().tolist()
    np.testing.assert_allclose(answer["probabilities"], p, atol=2e-6)
    assert answer["index"] == int(np.argmax(p)) and answer["answer"] == classes[answer["index"]]
    assert answer["saliency"]["class"] == k and answer["saliency"]["name"] == classes[k]
    g = np.array(answer["saliency"]["gradient"])
    assert g.shape == (784,)
    np.testing.assert_allclose(g, gradient.ravel(), atol=1e-3 * np.abs(gradient).max())
    names = {id(layer): prefix for prefix, layer in twin.named}
    assert [entry["label"] for entry in answer["maps"]] == [
        token + (f" ({names[id(layer)]})" if id(layer) in names else "") for token, layer, _ in outputs]
    for entry, (token, layer, out) in zip(answer["maps"], outputs):
        assert entry["shape"] == list(out.shape)
        if out.ndim == 3:
            channels = entry["channels"]
            assert len(entry["maps"]) == len(channels) == min(8, len(out)) and channels == sorted(set(channels))
            for c, sent in zip(channels, entry["maps"]):
                np.testing.assert_allclose(sent, out[c], atol=1e-3 * max(np.abs(out[c]).max(), 1e-30))
        else:
            np.testing.assert_allclose(entry["values"], out, atol=1e-3 * max(np.abs(out).max(), 1e-30))
    assert isinstance(answer["ms"], float) and answer["ms"] > 0


# --- the page's files, and nothing else from disk --------------------------------------------
@pytest.mark.parametrize("path, name, kind", [("/", "index.html", "text/html"), ("/page.js", "page.js",
                                              "text/javascript"), ("/page.css", "page.css", "text/css"),
                                              ("/?reload=1", "index.html", "text/html")])
def test_the_page_files_are_served(site, path, name, kind):
    status, headers, data = call(site.port, "GET", path)
    assert status == 200 and headers["Content-Type"].startswith(kind)
    assert data == (site.folder / "page" / name).read_bytes()


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/..%2fsecret.txt", "/%2e%2e/secret.txt", "/%2e%2e%2fsecret.txt", "/page/../secret.txt",
    "/page.js/../../secret.txt", "/./../secret.txt", "//secret.txt", "/..\\secret.txt", "/%2E%2E/secret.txt",
    "/page.js%00", "/index.html", "/page.js/", "/secret.txt", "/../../../../../../etc/passwd", "/%2fetc%2fpasswd",
    "/tools/page_server.py", "/mnist_net.py", "http://127.0.0.1/../secret.txt", "/favicon.ico"])
def test_no_path_reaches_outside_the_page(site, path):
    answer = raw_request(site.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    status, obj = parsed(answer)
    assert status == 404
    one_line_error(obj)
    assert b"SECRET" not in answer and b"root:" not in answer and b"import" not in answer


# --- GET /api/status --------------------------------------------------------------------------
def test_status_of_a_loaded_model_is_ready_with_empty_curves(site):
    status, s = api(site.port, "GET", "/api/status")
    assert status == 200
    assert s["phase"] == "ready" and s["spec"] == site.net.spec and s["dataset"] == "MNIST"
    assert s["classes"] == list("0123456789")
    assert s["loss"] == s["train_accuracy"] == s["test_accuracy"] == [] and s["seconds_left"] is None
    weight = site.net.state["conv1.weight"]
    np.testing.assert_allclose(s["filters"], weight[:, 0], atol=1e-3 * np.abs(weight).max())


# --- POST /api/predict ------------------------------------------------------------------------
def test_a_drawn_digit_is_prepared_like_predict_and_answered_with_maps_and_saliency(site):
    picture = pad(7, np.random.default_rng(0))
    status, answer = api(site.port, "POST", "/api/predict", body_of(picture))
    assert status == 200
    image = own_digits.mnist_like(picture)                      # the same preparation as --predict
    check_answer(answer, site.net, image, site.page.dataset.classes)
    if REAL_DATA:
        assert answer["answer"] == "7"


def test_asking_for_a_class_gives_its_saliency(site):
    picture = pad(3, np.random.default_rng(1), height=90, canvas=(PAD, 300), centre=(70, 90))
    for klass in (0, 8):
        status, answer = api(site.port, "POST", "/api/predict", body_of(picture, **{"class": klass}))
        assert status == 200
        check_answer(answer, site.net, own_digits.mnist_like(picture), site.page.dataset.classes, klass)


def test_a_blank_pad_is_no_digit(site):
    status, answer = api(site.port, "POST", "/api/predict", body_of(np.full((PAD, PAD), 255)))
    assert status == 200
    assert answer["answer"] == "no digit" and answer["index"] is None and answer["saliency"] is None
    assert answer["probabilities"] == [0.0] * 10 and answer["prepared"] == [0] * 784 and answer["maps"] == []


# --- GET /api/test_digit and /api/mistake -----------------------------------------------------
def test_a_random_test_digit_comes_with_its_label(site):
    images, labels = site.test
    seen = set()
    for _ in range(4):
        status, answer = api(site.port, "GET", "/api/test_digit")
        assert status == 200
        i = answer["test_index"]
        seen.add(i)
        check_answer(answer, site.net, images[i], site.page.dataset.classes)
        assert answer["label"] == labels[i] and answer["label_name"] == str(labels[i])
        assert answer["right"] == (answer["index"] == labels[i])
    assert len(seen) > 1                                         # random, not always the same one
    status, answer = api(site.port, "GET", "/api/test_digit?index=5&class=2")
    assert status == 200 and answer["test_index"] == 5
    check_answer(answer, site.net, images[5], site.page.dataset.classes, 2)


def test_a_mistake_is_a_test_digit_the_network_gets_wrong(site):
    images, labels = site.test
    pred = m.predict_proba(chapter_copy(site.net), images).argmax(axis=1)
    status, answer = api(site.port, "GET", "/api/mistake?class=4")
    if (pred == labels).all():
        assert status == 404 and "every one" in one_line_error(answer)
        return
    assert status == 200 and answer["right"] is False
    i = answer["test_index"]
    assert pred[i] != labels[i] and answer["index"] == pred[i] and answer["label"] == labels[i]
    check_answer(answer, site.net, images[i], site.page.dataset.classes, 4)


def test_no_mistake_to_show_is_404(site, tmp_path):
    images, labels = site.test
    pred = m.predict_proba(chapter_copy(site.net), images).argmax(axis=1)
    right = pred == labels
    page = page_server.Page(site.page.dataset, site.net.spec, (images[right][:50], labels[right][:50]))
    page.ready(site.net)
    server = start_site(page, tmp_path)
    try:
        status, answer = api(server.server_address[1], "GET", "/api/mistake")
        assert status == 404 and "right" in one_line_error(answer)
    finally:
        server.shutdown()
        server.server_close()


# --- bad requests: the status, one line, and the server goes on --------------------------------
GOOD = {"pixels": [255] * 784, "width": 28, "height": 28}


def changed(**fields):
    body = dict(GOOD)
    for name, value in fields.items():
        if value is KeyError:
            del body[name]
        else:
            body[name] = value
    return json.dumps(body).encode()


def with_pixel(text):
    return b'{"width": 28, "height": 28, "pixels": [' + b"255, " * 100 + text + b", 255" * 683 + b"]}"


BAD_BODIES = [
    (b"{", "malformed JSON"), (b"", "malformed JSON"), (b"\xff\xfe\x00", "malformed JSON"),
    (b"[" * 100000, "malformed JSON"), (b"[1, 2]", "JSON object"), (b'"pixels"', "JSON object"),
    (b"null", "JSON object"), (changed(pixels=KeyError), "missing field 'pixels'"),
    (changed(width=KeyError), "missing field 'width'"), (changed(height=KeyError), "missing field 'height'"),
    (changed(pixels=[255] * 783), "783 values"), (changed(pixels=[255] * 785), "785 values"),
    (changed(pixels=[]), "0 values"), (changed(pixels="255"), "list"), (changed(pixels={"0": 1}), "list"),
    (changed(pixels=[[255]] * 784), "pixels[0] is [255]"), (with_pixel(b"256"), "pixels[100] is 256"),
    (with_pixel(b"-1"), "pixels[100] is -1"), (with_pixel(b"1.5"), "pixels[100] is 1.5"),
    (with_pixel(b"255.0"), "pixels[100] is 255.0"), (with_pixel(b'"7"'), "pixels[100]"),
    (with_pixel(b"true"), "pixels[100] is true"), (with_pixel(b"null"), "pixels[100] is null"),
    (with_pixel(b"NaN"), "NaN"), (with_pixel(b"Infinity"), "Infinity"), (with_pixel(b"-Infinity"), "Infinity"),
    (with_pixel(b"1e400"), "pixels[100]"), (with_pixel(b"1" + b"0" * 30), "pixels[100]"),
    (changed(width=27), "width"), (changed(width=1001), "width"), (changed(width="28"), "width"),
    (changed(width=True), "width"), (changed(width=28.0), "width"), (changed(height=None), "height"),
    (changed(height=0), "height"), (changed(**{"class": 10}), "class"), (changed(**{"class": -1}), "class"),
    (changed(**{"class": "3"}), "class"), (changed(**{"class": True}), "class"),
    (changed(**{"class": 2.0}), "class"),
]


@pytest.mark.parametrize("body, words", BAD_BODIES)
def test_a_bad_body_is_400_with_one_line(site, body, words):
    status, answer = api(site.port, "POST", "/api/predict", raw=body)
    assert status == 400
    assert words in one_line_error(answer)


def test_the_server_answers_after_bad_requests(site):
    for body, _ in BAD_BODIES[::3]:
        assert api(site.port, "POST", "/api/predict", raw=body)[0] == 400
    status, answer = api(site.port, "POST", "/api/predict", GOOD)
    assert status == 200 and answer["answer"] == "no digit"
    assert api(site.port, "GET", "/api/status")[0] == 200


@pytest.mark.parametrize("query, words", [("class=10", "?class="), ("class=x", "?class="), ("class=-1", "?class="),
                                          ("class=", "?class="), ("class=%D9%A3", "?class="),
                                          ("index=99999999", "?index="), ("index=1.5", "?index=")])
def test_a_bad_query_is_400_with_one_line(site, query, words):
    status, answer = api(site.port, "GET", f"/api/test_digit?{query}")
    assert status == 400 and words in one_line_error(answer)


def test_a_body_over_1_mb_is_refused_before_it_is_read(site):
    for length in (page_server.MAX_BODY + 1, 50_000_000):
        answer = raw_request(site.port, f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                                        "Content-Type: application/json\r\n\r\n".encode() + b"[" * 1000)
        status, obj = parsed(answer)
        assert status == 413 and "1 MB" in one_line_error(obj)
    assert api(site.port, "GET", "/api/status")[0] == 200


@pytest.mark.parametrize("head, status, words", [
    ("POST /api/predict HTTP/1.0\r\n", 411, "Content-Length"),
    ("POST /api/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n", 411, "chunked"),
    ("POST /api/predict HTTP/1.0\r\nContent-Length: ten\r\n", 400, "Content-Length"),
    ("POST /api/predict HTTP/1.0\r\nContent-Length: -5\r\n", 400, "Content-Length"),
    ("POST /api/predict HTTP/1.0\r\nContent-Length: \u00b2\r\n", 400, "Content-Length"),
    ("GET /api/predict HTTP/1.0\r\n", 405, "POST"),
    ("POST /api/status HTTP/1.0\r\nContent-Length: 0\r\n", 405, "GET"),
    ("POST / HTTP/1.0\r\nContent-Length: 0\r\n", 405, "GET"), ("PUT / HTTP/1.0\r\n", 501, "PUT"),
    ("DELETE /api/status HTTP/1.0\r\n", 501, "DELETE"), ("GET /api/nothing HTTP/1.0\r\n", 404, "no such page"),
    ("GET / HTTP/9.9\r\n", 505, "version"),
])
def test_requests_the_server_does_not_serve(site, head, status, words):
    got, obj = parsed(raw_request(site.port, (head + "\r\n").encode("latin-1"), shut=True))
    assert got == status and words in one_line_error(obj)


def test_a_body_shorter_than_its_length_or_too_slow(site, monkeypatch):
    head = b"POST /api/predict HTTP/1.0\r\nContent-Length: 100\r\n\r\n"
    status, obj = parsed(raw_request(site.port, head + b'{"pixels"', shut=True))
    assert status == 400 and "9 of its 100 bytes" in one_line_error(obj)
    monkeypatch.setattr(page_server.Handler, "timeout", 0.5)
    status, obj = parsed(raw_request(site.port, head + b'{"pixels"'))       # and then nothing
    assert status == 408 and one_line_error(obj)
    monkeypatch.undo()
    assert api(site.port, "GET", "/api/status")[0] == 200


def test_garbage_and_dropped_connections_do_not_stop_the_server(site, capfd):
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200), b"GET\r\n\r\n", b"\r\n\r\n", b""):
        raw_request(site.port, junk, shut=True)
    with socket.create_connection(("127.0.0.1", site.port)) as s:        # gone mid-body
        s.sendall(b"POST /api/predict HTTP/1.0\r\nContent-Length: 5000\r\n\r\n{")
    assert api(site.port, "GET", "/api/status")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_a_failure_inside_is_500_and_one_logged_line(site, monkeypatch, capfd):
    def broken():
        raise RuntimeError("the disk\nfell off")
    monkeypatch.setattr(site.page, "status", broken)
    status, answer = api(site.port, "GET", "/api/status")
    assert status == 500 and "RuntimeError: the disk fell off" in one_line_error(answer)
    monkeypatch.undo()
    assert api(site.port, "GET", "/api/status")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == ["page: GET /api/status: RuntimeError: the disk fell off"]


def test_predict_and_test_digits_wait_for_the_training(models, tmp_path):
    page = page_server.Page(m.DATASETS["mnist"], "seed", (np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)),
                            epochs=2, steps=10)
    server = start_site(page, tmp_path)
    try:
        port = server.server_address[1]
        for method, path, body in (("POST", "/api/predict", GOOD), ("GET", "/api/test_digit", None),
                                   ("GET", "/api/mistake", None)):
            status, answer = api(port, method, path, body)
            assert status == 503 and one_line_error(answer) == "still training"
        status, s = api(port, "GET", "/api/status")
        assert status == 200 and s["phase"] == "training" and (s["epochs"], s["steps"]) == (2, 10)
        assert s["filters"] is None                          # no network yet
    finally:
        server.shutdown()
        server.server_close()


def test_without_test_images_the_pad_still_works(models, tmp_path, capsys):
    args = cl.parse_args(["--serve", "--load-model", models["seed"], "--data-dir", str(tmp_path / "nothing"),
                          "--no-download"])
    page, _ = page_server.page_of(args)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: no test images (") and len(err[0]) <= 100
    for mistake in (False, True):
        with pytest.raises(page_server.BadRequest) as e:
            page.test_digit("", mistake)
        assert e.value.status == 503 and str(e.value).startswith("no test images: ")
    assert page.predict(GOOD)["answer"] == "no digit"
    assert page.predict(body_of(pad(1, np.random.default_rng(3))))["answer"] in page.dataset.classes


# --- two at a time ----------------------------------------------------------------------------
def test_concurrent_requests_each_get_their_own_answer(site):
    """Pad drawings and test digits sent at once from threads, each asking the saliency of
    another class: each answer equals the one the same request gets alone."""
    rng = np.random.default_rng(7)
    requests = []
    for k in range(6):
        requests.append(("POST", "/api/predict", body_of(pad(k + 2, rng), **{"class": k})))
        requests.append(("GET", f"/api/test_digit?index={10 + k}&class={9 - k}", None))
    alone = [api(site.port, *r)[1] for r in requests]
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(i):
        barrier.wait()
        results[i] = api(site.port, *requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (status, together), single in zip(results, alone):
        assert status == 200
        for key in ("answer", "index", "prepared"):
            assert together[key] == single[key]
        assert together["saliency"]["class"] == single["saliency"]["class"]
        np.testing.assert_allclose(together["probabilities"], single["probabilities"], atol=1e-6)
        np.testing.assert_allclose(together["saliency"]["gradient"], single["saliency"]["gradient"], rtol=1e-5,
                                   atol=1e-9)
        for a, b in zip(together["maps"], single["maps"]):
            assert a["label"] == b["label"]
            np.testing.assert_allclose(a.get("maps", a.get("values")), b.get("maps", b.get("values")),
                                       rtol=1e-5, atol=1e-9)
    assert len({json.dumps(r[1]["saliency"]["gradient"]) for r in results}) == len(requests)


# --- a deep model and a Fashion-MNIST model -----------------------------------------------------
def test_a_deep_model_sends_every_layer_and_8_maps_followed_through_each_block(models, tmp_path):
    args = cl.parse_args(["--serve", "--load-model", models["deep"], "--data-dir", models["data"],
                          "--no-download", "--quiet"])
    page, _ = page_server.page_of(args)
    picture = pad(4, np.random.default_rng(2))
    answer = page.predict(body_of(picture))
    net = load_model(models["deep"])
    answer["ms"] = 1.0
    check_answer(answer, net, own_digits.mnist_like(picture), page.dataset.classes)
    labels = [entry["label"] for entry in answer["maps"]]
    assert labels[:4] == ["conv16p1 (conv1)", "bn (bn1)", "relu", "pool"] and labels[-1] == "fc10 (fc2)"
    blocks = [[entry["channels"] for entry in answer["maps"][i:i + 4]] for i in (0, 4)]
    for block in blocks:
        assert all(channels == block[0] for channels in block)     # the same maps down to the next conv
    x = m.to_input(own_digits.mnist_like(picture)[None], net.mean, net.std)
    outputs = layer_outputs(chapter_copy(net), x)
    activity = np.abs(outputs[3][2]).mean(axis=(1, 2))               # after the first pool
    assert blocks[0][0] == sorted(np.argsort(-activity, kind="stable")[:8].tolist())


def test_a_fashion_model_prepares_like_fashion_and_names_its_classes(models):
    args = cl.parse_args(["--serve", "--load-model", models["fashion"], "--data-dir", models["fashion_data"],
                          "--no-download", "--quiet"])
    page, _ = page_server.page_of(args)
    names = list(m.DATASETS["fashion"].classes)
    assert page.status()["dataset"] == "Fashion-MNIST" and page.status()["classes"] == names
    photo = np.full((200, 150), 250.0)
    photo[30:170, 40:110] = 90                                      # a dark garment on white
    answer = page.predict(body_of(photo.astype(int)))
    assert answer["prepared"] == own_digits.fashion_like(photo.astype(int).astype(float)).ravel().tolist()
    assert answer["answer"] in names and answer["saliency"]["name"] in names
    digit = page.test_digit("index=3")
    assert digit["label_name"] == names[digit["label"]] and digit["answer"] in names


# --- the command line -------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--port", "8001"], "--port goes with --serve"), (["--host", "0.0.0.0"], "--host goes with --serve"),
    (["--serve", "--port", "70000"], "--port"), (["--serve", "--port", "x"], "--port"),
    (["--serve", "--show-maps", "0"], "not with --show-maps"), (["--serve", "--why", "0"], "not with --why"),
    (["--serve", "--plot", "p.png"], "not with --plot"),
    (["--serve", "--log-file", "l.txt"], "not with --log-file"),
    (["--serve", "--diagnose"], "not with --diagnose"), (["--serve", "--host", " "], "--host"),
])
def test_serve_flags_are_checked_in_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        m.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and all(len(line) <= 100 for line in err)


def test_a_busy_port_is_one_line_and_exit_2(models, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = m.main(["--serve", "--load-model", models["seed"], "--port", str(port),
                       "--data-dir", models["data"], "--no-download", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and err.splitlines() == [f"error: --port {port}: the port is in use; pick another, "
                                              "or --port 0 for any free one"]
    assert "Serving" not in out


def test_another_host_warns_and_ctrl_c_says_stopped(models, capsys, monkeypatch):
    def interrupted(self, poll_interval=0.5):
        raise KeyboardInterrupt
    monkeypatch.setattr(page_server.Server, "serve_forever", interrupted)
    code = m.main(["--serve", "--load-model", models["seed"], "--host", "0.0.0.0", "--port", "0", "--data-dir",
                   models["data"], "--no-download"])
    out, err = capsys.readouterr()
    assert code == 130
    assert re.search(r"^Serving the page at http://0\.0\.0\.0:(\d+)/$", out, re.M)
    assert ":0/" not in out                                          # the real port, not 0
    assert out.splitlines()[-1] == "Stopped."
    assert err.splitlines() == ["warning: --host 0.0.0.0: the page is reachable from other machines"]


def test_a_training_that_blows_up_stops_the_server_with_advice(models, tmp_path, capsys):
    data = tmp_path / "data"
    write_mnist(str(data))                                 # as test_cli's: it blows up in epoch 1
    code = m.main(["--serve", "--port", "0", "--data-dir", str(data), "--optimizer", "momentum", "--sgd-lr", "1e6",
                   "--schedule", "constant", "--quiet", "--no-download"])
    out, err = capsys.readouterr()
    assert code == 1 and "lower the learning rate" in err and "Traceback" not in err
    assert out.startswith("Serving the page at http://127.0.0.1:")


def start_program(*argv, cwd):
    """python3 mnist_net.py ARGV as a program; its first line.  Ctrl-C reaches it as in a terminal
    (a child of a shell's background job would inherit SIGINT ignored: Python's handler is put back)."""
    script = os.path.join(ROOT, "mnist_net.py")
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.path.insert(0, {ROOT!r}); sys.argv = {[script, *map(str, argv)]!r}; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return process, process.stdout.readline()


def stop_program(process):
    """Ctrl-C: (exit code, the rest of stdout, stderr)."""
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    return process.returncode, process.stdout.read(), process.stderr.read()     # read after readline's buffer


def test_a_saved_model_answers_its_first_page_in_under_3_seconds(models, tmp_path):
    t0 = time.perf_counter()
    process, first = start_program("--serve", "--load-model", models["seed"], "--port", 0, "--data-dir",
                                   models["data"], "--no-download", cwd=tmp_path)
    try:
        match = re.fullmatch(r"Serving the page at http://127\.0\.0\.1:(\d+)/\n", first)
        assert match, first
        status, headers, data = call(int(match[1]), "GET", "/")
        seconds = time.perf_counter() - t0
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert data == open(os.path.join(page_server.PAGE_DIR, "index.html"), "rb").read()
        assert seconds < 3, f"the first page took {seconds:.1f} s"
        assert api(int(match[1]), "GET", "/api/status")[1]["phase"] == "ready"
    finally:
        code, out, err = stop_program(process)
    assert code == 130 and out.splitlines()[-1] == "Stopped."
    assert err == ""
    assert all(len(line) <= 100 for line in (first + out).splitlines())


def test_the_curves_grow_while_serve_trains_and_ctrl_c_stops_the_training(tmp_path):
    """--serve without --load-model: the page is up before the training, and the curves gain a new
    measured point at least once per second of training; Ctrl-C stops it all at once."""
    data = tmp_path / "data"
    write_mnist(str(data), n_train=3000, n_test=200)
    # a tiny learning rate: the loss stays well above 0, so the steps keep their speed
    process, first = start_program("--serve", "--port", 0, "--data-dir", data, "--no-download", "--epochs", 200,
                                   "--batch-size", 16, "--lr", 1e-7, "--sgd-lr", 1e-7, cwd=tmp_path)
    try:
        match = re.fullmatch(r"Serving the page at http://127\.0\.0\.1:(\d+)/\n", first)
        assert match, first
        port = int(match[1])
        polls = []
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            status, s = api(port, "GET", "/api/status")
            assert status == 200 and s["phase"] == "training"
            if s["loss"]:
                polls.append((time.perf_counter(), s))
                if polls[-1][0] - polls[0][0] >= 3 and s["test_accuracy"]:
                    break
            time.sleep(0.25)
        assert len(polls) >= 8, "the training did not start"
        status, answer = api(port, "POST", "/api/predict", GOOD)
        assert status == 503 and answer == {"error": "still training"}
    finally:
        code, out, err = stop_program(process)
    (t_first, first_status), (t_last, last) = polls[0], polls[-1]
    assert last["epochs"] == 200 and last["steps"] == 200 * 188 and 0 < last["step"] < last["steps"]
    assert last["epoch"] == (last["step"] - 1) // 188 + 1 and last["seconds_left"] > 0
    new_points = len(last["loss"]) - len(first_status["loss"])
    assert new_points >= (t_last - t_first) - 1, (new_points, t_last - t_first)
    for curve in ("loss", "train_accuracy"):
        steps = [step for step, _ in last[curve]]
        assert steps == sorted(set(steps)) and len(steps) == len(last["loss"])
    values = [v for _, v in last["loss"]]
    assert all(1.5 < v < 3.5 for v in values) and len(set(values)) > len(values) // 2   # measured, each its own
    assert all(0 <= v <= 1 for _, v in last["train_accuracy"] + last["test_accuracy"])
    assert [e for e, _ in last["test_accuracy"]] == list(range(1, len(last["test_accuracy"]) + 1))
    assert np.array(last["filters"]).shape == (8, 3, 3) and last["filters"] != first_status["filters"]
    assert code == 130 and out.splitlines()[-1] == "Stopped." and "Traceback" not in err
    assert all(len(line) <= 100 for line in (first + out + err).splitlines())


# --- the preparation's connected parts, in NumPy ---------------------------------------------
def parts_by_flood_fill(mask, share):
    """keep_large_parts as a breadth-first flood fill, one pixel at a time (8 neighbours)."""
    h, w = mask.shape
    labels = np.zeros((h, w), int)
    sizes = [0]
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        labels[y0, x0] = len(sizes)
        queue, size = collections.deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in range(max(y - 1, 0), min(y + 2, h)):
                for nx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = len(sizes)
                        queue.append((ny, nx))
        sizes.append(size)
    sizes = np.array(sizes)
    return (sizes >= share * sizes.max())[labels] & mask


def test_keep_large_parts_equals_a_flood_fill():
    rng = np.random.default_rng(0)
    masks = [rng.random(tuple(rng.integers(1, 70, 2))) < rng.uniform(0.02, 0.6) for _ in range(40)]
    comb = np.zeros((41, 41), bool)                    # one long winding part: a serpentine
    comb[::4, 1:-1] = True
    comb[1::4, -2] = comb[2::4, -2] = comb[3::4, 1] = True
    diagonal = np.eye(30, dtype=bool) | np.eye(30, k=5, dtype=bool)[::-1]    # touching at corners only
    masks += [comb, diagonal, np.zeros((5, 7), bool), np.ones((3, 4), bool), np.ones((1, 9), bool)]
    for mask in masks:
        for share in (0.0, 0.1, 0.5, 1.0):
            np.testing.assert_array_equal(own_digits.keep_large_parts(mask, share),
                                          parts_by_flood_fill(mask, share))
    crumb = np.zeros((50, 50), bool)
    crumb[5:40, 10:14] = True
    crumb[45, 45] = True
    assert not own_digits.keep_large_parts(crumb)[45, 45] and own_digits.keep_large_parts(crumb)[5:40, 10:14].all()
