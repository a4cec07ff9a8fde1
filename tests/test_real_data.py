"""The real data routes, end to end: only where the package archives are reachable
(CI sets MNIST_NET_REAL_DATA=1); every other test runs without a network.  MNIST comes
through the package index, Fashion-MNIST through the Debian package (apt-get's package
lists must be there: .ci/run runs apt-get update first)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mnist_net as m
from conftest import ROOT
from drawn_digits import draw_digit, write_pgm
from tools import fetch_data

pytestmark = pytest.mark.skipif(not os.environ.get("MNIST_NET_REAL_DATA"),
                                reason="set MNIST_NET_REAL_DATA=1 to fetch real MNIST and Fashion-MNIST")
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


@pytest.fixture(scope="module")
def real_fashion(tmp_path_factory):
    data = tmp_path_factory.mktemp("real_fashion") / "data"
    got = run("--dataset", "fashion", "--data-dir", str(data), "--download-only")
    assert got.returncode == 0, got.stdout + got.stderr
    return data, got.stdout


def test_fetch_and_verify_real_fashion_mnist(real_fashion):
    data, out = real_fashion
    assert sorted(os.listdir(data)) == sorted(fetch_data.FASHION_SHA256)
    for name, digest in fetch_data.FASHION_SHA256.items():
        assert fetch_data.sha256((data / name).read_bytes()) == digest
    assert out.count("canonical Fashion-MNIST") == 4


def test_one_epoch_of_fashion_mnist_names_the_classes(real_fashion, tmp_path):
    """1 epoch on 10,000 images (81% here), then the saved model reads real test images back,
    sent through --predict as pictures, by name."""
    data, _ = real_fashion
    log, model = tmp_path / "log.txt", tmp_path / "m.npz"
    got = run("--dataset", "fashion", "--data-dir", str(data), "--no-download", "--epochs", "1",
              "--limit", "10000", "--log-file", str(log), "--save-model", str(model), "--quiet")
    assert got.returncode == 0, got.stderr
    assert "Full Fashion-MNIST test accuracy:" in got.stdout
    assert "# data set Fashion-MNIST; labels: 0 T-shirt/top, 1 Trouser," in log.read_text()
    table = np.loadtxt(log, dtype=int)
    assert table.shape == (10000, 2) and (table[:, 0] == table[:, 1]).mean() > 0.75
    names = m.DATASETS["fashion"].classes
    test_x, _ = m.load_split(str(data), "test", "Fashion-MNIST")
    right = np.flatnonzero(table[:, 0] == table[:, 1])[:10]
    paths = []
    for i in right:
        np.save(tmp_path / f"item{i}.npy", test_x[i])
        paths.append(str(tmp_path / f"item{i}.npy"))
    got = run("--load-model", str(model), "--predict", *paths)
    assert got.returncode == 0, got.stdout + got.stderr
    lines = got.stdout.splitlines()
    assert lines[0].startswith(f"Model {model}: trained on Fashion-MNIST")
    predicted = [line.split("prediction ")[1].split(" (p=")[0] for line in lines[1:]]
    assert sum(p == names[table[i, 1]] for i, p in zip(right, predicted)) >= 8, got.stdout
