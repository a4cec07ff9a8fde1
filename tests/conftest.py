import gzip
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a benchmark that times whole runs; .ci/run's portable subset, which it runs on "
        "every other Python, leaves these out (-m 'not slow'), as it does the browser and real-data tests")


def idx_images(images):
    images = np.asarray(images, np.uint8)
    return struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes()


def idx_labels(labels):
    labels = np.asarray(labels, np.uint8)
    return struct.pack(">II", 2049, len(labels)) + labels.tobytes()


def synthetic_digits(n, seed):
    """Learnable fake digits: each class is a bright bar at its own place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, d in enumerate(labels):
        r = 3 + 2 * d
        images[i, r:r + 3, 4:24] = 250
    return images, labels


def write_mnist(folder, n_train=300, n_test=100, gz=False, dotted=False, seed=0):
    """The four IDX files of a small synthetic MNIST, written into folder."""
    os.makedirs(folder, exist_ok=True)
    train = synthetic_digits(n_train, seed)
    test = synthetic_digits(n_test, seed + 1)
    files = {
        "train-images-idx3-ubyte": idx_images(train[0]),
        "train-labels-idx1-ubyte": idx_labels(train[1]),
        "t10k-images-idx3-ubyte": idx_images(test[0]),
        "t10k-labels-idx1-ubyte": idx_labels(test[1]),
    }
    paths = {}
    for name, content in files.items():
        filename = name.replace("-idx", ".idx") if dotted else name
        if gz:
            filename += ".gz"
            content = gzip.compress(content)
        path = os.path.join(folder, filename)
        with open(path, "wb") as f:
            f.write(content)
        paths[name] = path
    return paths, train, test


@pytest.fixture
def small_mnist(tmp_path):
    folder = tmp_path / "data"
    paths, train, test = write_mnist(str(folder))
    return str(folder), train, test
