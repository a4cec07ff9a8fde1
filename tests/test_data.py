"""Reading IDX files through python-mnist, and refusing damaged ones clearly."""
import gzip
import os

import numpy as np
import pytest

import mnist_net as m
from conftest import idx_images, idx_labels, write_mnist


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_reads_raw_and_gz_dash_and_dot_names(tmp_path, gz, dotted):
    _, train, test = write_mnist(str(tmp_path), n_train=50, n_test=20, gz=gz, dotted=dotted)
    train_x, train_y, test_x, test_y = m.load_mnist(str(tmp_path))
    assert train_x.dtype == np.uint8 and train_x.shape == (50, 28, 28)
    np.testing.assert_array_equal(train_x, train[0])
    np.testing.assert_array_equal(train_y, train[1])
    np.testing.assert_array_equal(test_x, test[0])
    np.testing.assert_array_equal(test_y, test[1])


def damage(tmp_path, name, content):
    paths, _, _ = write_mnist(str(tmp_path), n_train=50, n_test=20)
    with open(paths[name], "wb") as f:
        f.write(content)
    return paths[name]


def load_error(tmp_path):
    with pytest.raises(m.DataError) as e:
        m.load_mnist(str(tmp_path))
    return str(e.value)


def test_truncated_images(tmp_path):
    good = idx_images(np.zeros((50, 28, 28)))
    path = damage(tmp_path, "train-images-idx3-ubyte", good[:-100])
    msg = load_error(tmp_path)
    assert path in msg and "truncated" in msg


def test_truncated_header(tmp_path):
    path = damage(tmp_path, "t10k-labels-idx1-ubyte", b"\x00\x00\x08")
    msg = load_error(tmp_path)
    assert path in msg and "too short" in msg


def test_wrong_magic(tmp_path):
    content = bytearray(idx_labels(np.zeros(50)))
    content[3] = 0x03                                       # 2051 (images) instead of 2049
    path = damage(tmp_path, "train-labels-idx1-ubyte", bytes(content))
    msg = load_error(tmp_path)
    assert path in msg and "magic number 2051, expected 2049" in msg


def test_count_mismatch(tmp_path):
    damage(tmp_path, "train-labels-idx1-ubyte", idx_labels(np.zeros(49)))
    msg = load_error(tmp_path)
    assert "50 images" in msg and "49 labels" in msg


def test_label_ten(tmp_path):
    labels = np.zeros(20)
    labels[7] = 10
    path = damage(tmp_path, "t10k-labels-idx1-ubyte", idx_labels(labels))
    msg = load_error(tmp_path)
    assert path in msg and "label 10 at index 7" in msg


def test_wrong_image_size(tmp_path):
    import struct
    content = struct.pack(">IIII", 2051, 50, 27, 29) + bytes(50 * 27 * 29)
    path = damage(tmp_path, "train-images-idx3-ubyte", content)
    msg = load_error(tmp_path)
    assert path in msg and "(27, 29)" in msg


def test_trailing_bytes(tmp_path):
    path = damage(tmp_path, "train-labels-idx1-ubyte", idx_labels(np.zeros(50)) + b"xx")
    msg = load_error(tmp_path)
    assert path in msg and "longer than its header" in msg


def test_html_saved_as_gz(tmp_path):
    write_mnist(str(tmp_path), n_train=50, n_test=20)
    os.remove(tmp_path / "train-images-idx3-ubyte")
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"<html><body>403 Forbidden</body></html>")
    msg = load_error(tmp_path)
    assert str(bad) in msg and "not a valid gzip file" in msg
    assert bad.read_bytes().startswith(b"<html>")          # the user's file is left alone


def test_truncated_gz(tmp_path):
    write_mnist(str(tmp_path), n_train=50, n_test=20)
    content = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    os.remove(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(content)[:-500])
    assert "not a valid gzip file" in load_error(tmp_path)


def test_missing_file_names_it_and_its_spellings(tmp_path):
    write_mnist(str(tmp_path), n_train=50, n_test=20)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    msg = load_error(tmp_path)
    assert "t10k-images-idx3-ubyte: missing" in msg and "t10k-images.idx3-ubyte.gz" in msg


def test_to_input_scales_by_mnist_mean_and_std():
    images = np.array([[[0] * 28] * 28, [[255] * 28] * 28], np.uint8)
    x = m.to_input(images)
    assert x.dtype == np.float32 and x.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(x[0], -m.PIXEL_MEAN / m.PIXEL_STD, rtol=1e-6)
    np.testing.assert_allclose(x[1], (1 - m.PIXEL_MEAN) / m.PIXEL_STD, rtol=1e-6)
