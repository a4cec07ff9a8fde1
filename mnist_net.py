"""A convolutional network for MNIST digits, written from scratch in NumPy.

Every piece a deep-learning framework would hide is here, in the order a
batch meets it: reading the IDX files, the layers (an im2col convolution,
ReLU, a 2x2 max-pool, batch norm, dropout, dense layers, softmax
cross-entropy), each with its backward pass right under its forward pass,
then the network as a list of those layers, Adam, AdamW and SGD with
momentum, and the training loop.  It is not a framework: a layer is a small
class, the network is a list walked forward and then back, and the training
loop is a for loop.

    python3 mnist_net.py                    # the original network, 5 epochs, about 98.7%
    python3 mnist_net.py --net deep         # two conv blocks with batch norm, about 99.3%
    python3 mnist_net.py --net "conv8 relu conv16 relu pool dropout0.25 fc64 relu fc10"
    python3 mnist_net.py --dataset fashion  # Fashion-MNIST: clothes instead of digits
    python3 mnist_net.py --help

The original network (--net seed; shapes for one image, F = 8 filters, H = 128):

    image (1, 28, 28)
    -> conv 3x3, F filters, + bias  (F, 26, 26)   26 = 28 - 3 + 1
    -> ReLU                         (F, 26, 26)
    -> 2x2 max-pool                 (F, 13, 13)
    -> flatten                      (F*13*13,)    1352 for F = 8
    -> dense + bias, ReLU           (H,)
    -> dense + bias                 (10,)         one score (logit) per digit
    -> softmax cross-entropy against the true digit

Conventions: a batch of images is x: (N, C, H, W); conv weights are
(F, C, KH, KW); a dense layer's weight is (out, in), as in PyTorch, so
y = x @ w.T + b.  Maps between layers are (N, C, H, W) arrays; a conv that
feeds a pool hands its maps over in "pool order" instead (see
agree_on_pool_order).  Parameters are keyed like PyTorch's state_dict
("conv1.weight", "bn1.running_var", "fc2.bias", ...).  Training runs in
float32; the tests run every backward pass in float64 against finite
differences.
"""
import argparse
import itertools
import math
import os
import re
import sys
import time

import numpy as np

from tools import fetch_data, own_digits, reports    # what is not about the network

# ---------------------------------------------------------------------------
# Defaults: the recipe of the default run, each with its reason.
# ---------------------------------------------------------------------------
EPOCHS = 5
BATCH_SIZE = 128           # big enough for BLAS to be efficient, small enough for many steps
DEEP_BATCH_SIZE = 64       # --net deep's recipe: twice the steps in 5 epochs, 99.31% median over
                           # seeds 0-2 where 128 gave 99.23% (see README, Results)
ADAM_LR = 3e-3             # Adam's step size; with the momentum part below it beats 1e-3
SGD_LR = 0.01              # step size of the SGD-with-momentum part
MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)  # Adam's usual decay rates for the mean and variance estimates
ADAM_EPS = 1e-8
FILTERS = 8
HIDDEN = 128
WEIGHT_DECAY = 0.01        # AdamW's decay (PyTorch's default); only --optimizer adamw uses it
SEED = 0
PIXEL_MEAN = 0.1307        # mean and std of MNIST training pixels after /255: inputs
PIXEL_STD = 0.3081         # centred at 0 with unit spread train about 0.2 points better
EVAL_BATCH = 128           # test images per forward pass: 256 falls out of the CPU caches (15% slower)

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(SCRIPT_DIR, "mnist_data")
LOG_FILE = "mnist_test_log.txt"


# ---------------------------------------------------------------------------
# 1. Data: the four IDX files, read through python-mnist, then checked.
# ---------------------------------------------------------------------------
# An IDX file is a big-endian header then raw bytes:
#   images: magic 2051, count N, rows 28, cols 28, then N*28*28 pixels (0-255)
#   labels: magic 2049, count N, then N labels (0-9)
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


class DataSet:
    """A data set in this format.  MNIST and Fashion-MNIST share the IDX format, the four
    file names, 60,000 + 10,000 28x28 grey images and 10 classes: one loader reads both."""

    def __init__(self, key, title, folder, classes, mean, std):
        self.key = key                    # its --dataset name
        self.title = title                # how the reports name it
        self.folder = folder              # its own folder (the file names are the same)
        self.classes = classes            # class names, by label
        self.mean, self.std = mean, std   # of its training pixels after /255: see to_input


DATASETS = {
    "mnist": DataSet("mnist", "MNIST", DATA_DIR, tuple("0123456789"), PIXEL_MEAN, PIXEL_STD),
    # Fashion-MNIST's mean and std computed here from its real train-images-idx3-ubyte
    # (all 47,040,000 pixels, after /255): 0.28604 and 0.35302
    "fashion": DataSet("fashion", "Fashion-MNIST", os.path.join(DATA_DIR, "fashion"),
                       ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), 0.2860, 0.3530),
}


class DataError(Exception):
    """A data file is missing or damaged; the message says which and what to do."""


class ModelFileError(Exception):
    """A model file is missing, damaged or made for another network."""


def idx_spellings(name):
    """The file names `name` may have on disk: dash or dot spelling, raw or gzipped.

    Some unzip tools write 'train-images.idx3-ubyte' for 'train-images-idx3-ubyte'.
    """
    dotted = name.replace("-idx", ".idx")
    return [name, name + ".gz", dotted, dotted + ".gz"]


def find_idx_file(data_dir, name):
    """Path of the first spelling of `name` present in data_dir, or None."""
    for spelling in idx_spellings(name):
        path = os.path.join(data_dir, spelling)
        if os.path.isfile(path):
            return path
    return None


def read_idx_bytes(path):
    """The whole (decompressed) content of an IDX file, opened by python-mnist.

    python-mnist's MNIST object knows the IDX names and opens raw or .gz
    files.  Its load() would then turn 47 million pixels into Python ints
    (about 750 MB and 7 s for the training set), so we take the bytes and
    let NumPy view them as uint8 in one step instead.
    """
    import gzip
    import zlib
    try:
        from mnist import MNIST
    except ImportError:
        raise DataError("the python-mnist package is missing: pip install -r requirements.txt") from None

    folder, filename = os.path.split(path)
    loader = MNIST(folder, gz=filename.endswith(".gz"))
    stem = filename[:-3] if loader.gz else filename
    try:
        with loader.opener(os.path.join(folder, stem), "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); replace it with a good copy "
                        f"(delete it and run again to fetch it)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def parse_idx(raw, path, magic, item_shape, title="MNIST"):
    """Check an IDX header and return the payload as a uint8 array (N, *item_shape).

    python-mnist checks only the magic number; a truncated file or a wrong
    image size would slip through, so every field is checked here.
    """
    header_len = 4 * (2 + len(item_shape))
    if len(raw) < header_len:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header; "
                        "the file is truncated: replace it")
    header = np.frombuffer(raw, dtype=">u4", count=2 + len(item_shape))
    if header[0] != magic:
        raise DataError(f"{path}: magic number {header[0]}, expected {magic}: not {title} "
                        f"{'images' if magic == IMAGE_MAGIC else 'labels'}; replace it with the right file")
    n, shape = int(header[1]), tuple(int(d) for d in header[2:])
    if shape != item_shape:
        raise DataError(f"{path}: items are {shape}, expected {item_shape}: not {title}; replace it")
    expected = header_len + n * int(np.prod(item_shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path}: {len(raw)} bytes for {n} items, expected {expected}: "
                        f"the file is {what}; replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape((n,) + item_shape)


def load_split(data_dir, split, title="MNIST"):
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of split 'train' or 'test', checked;
    title names the data set in the error messages."""
    paths = {}
    for kind in ("images", "labels"):
        name = IDX_NAMES[f"{split}_{kind}"]
        paths[kind] = find_idx_file(data_dir, name)
        if paths[kind] is None:
            raise DataError(f"{os.path.join(data_dir, name)}: missing (also looked for "
                            f"{', '.join(idx_spellings(name)[1:])}); put the {title} files "
                            "there or run without --no-download to fetch them")
    images = parse_idx(read_idx_bytes(paths["images"]), paths["images"], IMAGE_MAGIC, (28, 28), title)
    labels = parse_idx(read_idx_bytes(paths["labels"]), paths["labels"], LABEL_MAGIC, (), title)
    if len(images) != len(labels):
        raise DataError(f"{paths['images']} has {len(images)} images but {paths['labels']} "
                        f"has {len(labels)} labels: the two files do not belong together")
    if len(labels) and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{paths['labels']}: label {labels[bad]} at index {bad}; "
                        f"{title} labels are 0-9: replace the file")
    return images, labels


def load_mnist(data_dir, title="MNIST"):
    """(train_x, train_y, test_x, test_y), images kept as uint8 until a batch needs them."""
    train_x, train_y = load_split(data_dir, "train", title)
    test_x, test_y = load_split(data_dir, "test", title)
    return train_x, train_y, test_x, test_y


# The scaling to_input applies: the mean and std of the data set in use.  run() sets
# them once, before any batch is made (from --dataset, or from the model file it loads).
input_mean, input_std = PIXEL_MEAN, PIXEL_STD


def use_input_scaling(mean, std):
    """Make to_input centre the pixels with this mean and std from now on."""
    global input_mean, input_std
    input_mean, input_std = float(mean), float(std)


def to_input(images_u8, out=None):
    """uint8 images (N, 28, 28) -> float32 network input (N, 1, 28, 28).

    x = (pixel / 255 - mean) / std, done as one multiply and one subtract, with the
    data set's mean and std (input_mean, input_std above).
    The data stay uint8 (47 MB for the training set, not 188 MB as float32);
    only the batch in use is converted.
    """
    n = len(images_u8)
    if out is None:
        out = np.empty((n, 1, 28, 28), np.float32)
    x = out.reshape(n, 28, 28)
    np.multiply(images_u8, np.float32(1 / (255 * input_std)), out=x)
    x -= np.float32(input_mean / input_std)
    return out


# ---------------------------------------------------------------------------
# 2. Layers.  Each layer is a small object: forward(x, train) returns its output
#    and keeps what its backward needs; backward(dout, need_dx), right under it,
#    takes dout (the gradient of the loss w.r.t. its output), stores the
#    gradients of its parameters in self.grads and returns dx (the gradient
#    w.r.t. its input; None when need_dx is False: nothing below it learns).
#    self.params and self.grads are views into the network's flat vectors
#    (section 3); self.ws holds the layer's reused arrays.
# ---------------------------------------------------------------------------
def buffer(ws, key, shape, dtype, zero=False):
    """An uninitialised array (zeros when first made if zero=True), reused from
    the workspace dict `ws` across steps.

    A fresh multi-megabyte array every step costs thousands of page faults
    (about 3 us each); keeping one per role avoids them.  ws=None allocates.
    """
    if ws is None:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    a = ws.get(key)
    if a is None or a.shape != tuple(shape) or a.dtype != dtype:
        a = ws[key] = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    return a


def buffer_like(ws, key, x):
    """A reused array of x's shape whose memory runs in the same axis order as x's.

    Conv and pool outputs are (N, C, H, W) arrays stored channel by channel
    (see Conv); an elementwise result stored the same way is written in one
    straight pass instead of a transposing one.
    """
    order = sorted(range(x.ndim), key=lambda axis: -x.strides[axis])     # outermost axis first
    stored = buffer(ws, key, [x.shape[axis] for axis in order], x.dtype)
    return stored.transpose(np.argsort(order))


def flat_together(*arrays):
    """The arrays (of one shape) as flat vectors in the order their values lie in memory
    (views), when all lie in one block in the same order; else the arrays themselves.
    Elementwise work on the flat vectors runs in one straight pass."""
    order = sorted(range(arrays[0].ndim), key=lambda axis: -arrays[0].strides[axis])
    stored = [a.transpose(order) for a in arrays]
    if all(a.flags.c_contiguous for a in stored):
        return [a.reshape(-1) for a in stored]
    return arrays


class Layer:
    """What every layer has; layers without parameters keep the dicts empty."""
    shapes = {}            # parameter name -> shape, PyTorch's layouts
    fan_in = 1             # inputs one output unit sees (for the initial weights)

    def __init__(self):
        self.params, self.grads, self.buffers, self.ws = {}, {}, {}, {}


# --- Convolution, through im2col ------------------------------------------
# out[n, f, i, j] = b[f] + sum over c, ki, kj of w[f, c, ki, kj] * xpad[n, c, i + ki, j + kj]
# where xpad is x with `pad` rows and columns of zeros around each map, and
#   H_out = (H + 2*pad - KH) // stride + 1      (stride 1 here: 26 = 28 - 3 + 1)
#
# im2col copies every KHxKW patch of xpad into one column of a matrix `cols`
# (C*KH*KW rows, one column per output pixel), so the whole convolution is one
# matrix product: out = w (F, C*KH*KW) @ cols.
#
# Layout: the output is an (N, F, H_out, W_out) array stored channel by channel
# (a transposed view of (F, N, H_out, W_out) memory): the product w @ cols
# gives it that way, and batch norm's per-channel sums read it in straight runs.
#
# Pool order, the one speed agreement between layers (see agree_on_pool_order):
# a conv whose maps go to a 2x2 pool orders its columns by the pool's windows.
# Output pixel (2p + di, 2q + dj) sits in block k = 2*di + dj (its place inside
# its window), at (f, n, p, q) within the block, so the output is
# (4, F, N, H_out/2, W_out/2) and the pool is an elementwise max of 4 blocks.
class Conv(Layer):
    kind = "conv"

    def __init__(self, in_channels, filters, kernel=3, pad=0):
        super().__init__()
        self.C, self.F, self.K, self.pad = in_channels, filters, kernel, pad
        self.shapes = {"weight": (filters, in_channels, kernel, kernel), "bias": (filters,)}
        self.fan_in = in_channels * kernel * kernel
        self.pool_order = False            # set by agree_on_pool_order()

    def forward(self, x, train=True):
        """x (N, C, H, W) -> (N, F, H_out, W_out), or (4, F, N, H_out/2, W_out/2) in pool order."""
        F = self.F
        xp = self.padded(x)                                         # (C, N, H + 2pad, W + 2pad)
        self.x_shape = x.shape
        _, N, Hpad, Wpad = xp.shape
        Ho, Wo = Hpad - self.K + 1, Wpad - self.K + 1
        if self.pool_order:
            self.cols = im2col_pool_order(xp, self.K, self.ws)     # (4, K + 1, N*Hp*Wp)
            out = buffer(self.ws, "out", (4, F, N, Ho // 2, Wo // 2), x.dtype)
        else:
            self.cols = im2col(xp, self.K, self.ws)                # (1, K + 1, N*Ho*Wo)
            out = buffer(self.ws, "out", (1, F, N, Ho, Wo), x.dtype)
        # out = [w | b] (F, K + 1) @ [cols; ones] (K + 1, P): every output pixel of every
        # filter, bias included (im2col's last row is ones: no separate pass to add b)
        np.matmul(self.weight_and_bias(), self.cols, out=out.reshape(len(out), F, -1))
        if self.pool_order:
            return out
        return out[0].transpose(1, 0, 2, 3)                         # (N, F, Ho, Wo) view

    def backward(self, dout, need_dx=True):
        """dout like the forward's output -> dx (N, C, H, W) or None; grads weight, bias.

        out = w @ cols + b, so dw = dout @ cols.T, db = dout summed over every
        position (dout @ the row of ones: it comes with dw), dcols = w.T @ dout, and
        dx adds dcols back through col2im.
        """
        w, cols = self.params["weight"], self.cols
        F, K = self.F, self.C * self.K * self.K
        N = self.x_shape[0]
        if not self.pool_order:
            dout = dout.transpose(1, 0, 2, 3)[None]                 # (1, F, N, Ho, Wo)
        dflat = dout.reshape(len(dout), F, -1)                        # (blocks, F, P); copies only if needed
        # [dw | db] = dout (F, P) @ [cols; ones].T (P, K + 1), summed over the blocks and chunks
        S = cols.shape[2] // N                                        # output pixels per map
        dwb = np.matmul(column_chunks(dflat, N, S),
                        column_chunks(cols, N, S).swapaxes(-1, -2)).sum(axis=(0, 1))   # (F, K + 1)
        self.grads["weight"][...] = dwb[:, :K].reshape(w.shape)
        self.grads["bias"][...] = dwb[:, K]
        if not need_dx:
            return None
        dcols = buffer(self.ws, "dcols", (len(cols), K, cols.shape[2]), cols.dtype)
        np.matmul(w.reshape(F, K).T, dflat, out=dcols)                 # (K, F) @ (F, P)
        col2 = col2im_pool_order if self.pool_order else col2im
        dxp = col2(dcols, (self.C, N) + self.padded_hw(), self.K, self.ws)     # (C, N, H + 2pad, W + 2pad)
        p = self.pad
        H, W = self.x_shape[2:]
        return dxp[:, :, p:p + H, p:p + W].transpose(1, 0, 2, 3)              # (N, C, H, W) view

    def weight_and_bias(self):
        """[w | b]: (F, C*KH*KW + 1)."""
        w, b = self.params["weight"], self.params["bias"]
        return np.concatenate([w.reshape(self.F, -1), b[:, None]], axis=1)

    def padded_hw(self):
        return self.x_shape[2] + 2 * self.pad, self.x_shape[3] + 2 * self.pad

    def padded(self, x):
        """x (N, C, H, W) -> (C, N, H + 2pad, W + 2pad), channel by channel, zeros around."""
        N, C, H, W = x.shape
        if self.pad == 0:
            return x.transpose(1, 0, 2, 3)                          # a view: im2col only reads it
        p = self.pad
        xp = buffer(self.ws, "padded", (C, N, H + 2 * p, W + 2 * p), x.dtype, zero=True)
        xp[:, :, p:p + H, p:p + W] = x.transpose(1, 0, 2, 3)       # the border stays 0
        return xp


def column_chunks(a, N, S):
    """(blocks, R, N*S) -> (blocks, chunks, R, width) view: the columns of each block
    (N maps of S pixels) cut into chunks of whole maps, at most 2,048 columns each.

    The weight gradient runs chunk by chunk, then sums the chunks' products: the same
    numbers, faster.  BLAS is slow on one product of a tiny (F, K) side with tens of
    thousands of columns (2.5x slower for the first conv of deep, 3x for seed's), and
    one product per map pays a call for every 169 columns.
    """
    blocks, R, P = a.shape
    maps = math.gcd(N, 2 ** max(0, int(math.log2(2048 / S))))   # a power of 2 that divides N
    chunks = N // maps
    return a.reshape(blocks, R, chunks, P // chunks).transpose(0, 2, 1, 3)


def im2col(xp, KH, ws=None):
    """xp (C, N, Hpad, Wpad) -> cols (1, C*KH*KW + 1, N*Ho*Wo), square kernels (KW = KH).

    cols[0, c*KH*KW + ki*KW + kj, (n, i, j)] = xp[c, n, i + ki, j + kj]; the last row is ones.
    """
    C, N, Hpad, Wpad = xp.shape
    KW = KH
    Ho, Wo = Hpad - KH + 1, Wpad - KW + 1
    K = C * KH * KW
    cols = buffer(ws, "cols", (1, K + 1, N * Ho * Wo), xp.dtype)
    cols[0, K] = 1
    patches = cols[0, :K].reshape(C, KH, KW, N, Ho, Wo)
    for ki, kj in itertools.product(range(KH), range(KW)):
        patches[:, ki, kj] = xp[:, :, ki:ki + Ho, kj:kj + Wo]      # every channel in one copy
    return cols


def col2im(dcols, xp_shape, KH, ws=None):
    """The adjoint of im2col: add every column back onto the pixels it was copied from."""
    C, N, Hpad, Wpad = xp_shape
    KW = KH
    Ho, Wo = Hpad - KH + 1, Wpad - KW + 1
    d = dcols.reshape(C, KH, KW, N, Ho, Wo)
    dxp = buffer(ws, "dxp", xp_shape, dcols.dtype)
    dxp[...] = 0
    for ki, kj in itertools.product(range(KH), range(KW)):
        dxp[:, :, ki:ki + Ho, kj:kj + Wo] += d[:, ki, kj]
    return dxp


def im2col_pool_order(xp, KH, ws=None):
    """xp (C, N, Hpad, Wpad) -> cols (4, C*KH*KW + 1, N*Hp*Wp) in pool order, Hp = Ho // 2.

    cols[2*di + dj, c*KH*KW + ki*KW + kj, (n, p, q)] = xp[c, n, 2p + di + ki, 2q + dj + kj];
    the last row of each block is ones.
    """
    C, N, Hpad, Wpad = xp.shape
    KW = KH
    Hp, Wp = (Hpad - KH + 1) // 2, (Wpad - KW + 1) // 2
    K = C * KH * KW
    block = buffer(ws, "cols", (4, K + 1, N * Hp * Wp), xp.dtype)
    block[:, K] = 1
    cols = block[:, :K].reshape(4, C, KH, KW, N, Hp, Wp)
    sub = subsampled(xp, KH, Hp, Wp, ws)                            # (C, 2, KW + 1, N, Hs, Wp)
    for ki, di, dj in itertools.product(range(KH), range(2), range(2)):
        r = ki + di
        # xp[:, :, r::2, s::2] cut to (Hp, Wp) is sub[:, r % 2, s] moved down by r // 2 rows;
        # the KW columns kj = 0, 1, 2 (s = dj + kj) are neighbouring blocks of sub,
        # so one copy fills KW rows of cols (a third of the calls)
        cols[2 * di + dj, :, ki] = sub[:, r % 2, dj:dj + KW, :, r // 2:r // 2 + Hp]
    return block


def subsampled(xp, KH, Hp, Wp, ws=None):
    """xp (C, N, Hpad, Wpad) -> sub (C, 2, KW + 1, N, Hs, Wp), Hs = Hp + KH // 2, a speed
    aid for im2col_pool_order: sub[:, a, s] = xp[:, :, a::2, s::2] cut to Hs rows and Wp
    columns (every other row from row a, every other column from column s).

    im2col could copy every other pixel straight from xp, but such a copy moves one
    float at a time.  Taken from these arrays, each of its blocks is Hp whole rows:
    Hp*Wp contiguous floats per image, 2.5x faster.
    """
    C, N, Hpad, Wpad = xp.shape
    KW, Hs = KH, Hp + KH // 2
    sub = buffer(ws, "sub", (C, 2, KW + 1, N, Hs, Wp), xp.dtype)
    for a, s in itertools.product(range(2), range(KW + 1)):
        rows = xp[:, :, a::2, s::2][:, :, :Hs, :Wp]                 # may be a row short: never read
        sub[:, a, s, :, :rows.shape[2]] = rows
    return sub


def col2im_pool_order(dcols, xp_shape, KH, ws=None):
    """The adjoint of im2col_pool_order (through the adjoint of subsampled)."""
    C, N, Hpad, Wpad = xp_shape
    KW = KH
    Hp, Wp = (Hpad - KH + 1) // 2, (Wpad - KW + 1) // 2
    Hs = Hp + KH // 2
    d = dcols.reshape(4, C, KH, KW, N, Hp, Wp)
    dsub = buffer(ws, "dsub", (C, 2, KW + 1, N, Hs, Wp), dcols.dtype)
    dsub[...] = 0
    for ki, di, dj in itertools.product(range(KH), range(2), range(2)):
        r = ki + di
        dsub[:, r % 2, dj:dj + KW, :, r // 2:r // 2 + Hp] += d[2 * di + dj, :, ki]
    dxp = buffer(ws, "dxp", xp_shape, dcols.dtype)
    dxp[...] = 0
    for a, s in itertools.product(range(2), range(KW + 1)):
        target = dxp[:, :, a::2, s::2][:, :, :Hs, :Wp]
        target += dsub[:, a, s, :, :target.shape[2]]
    return dxp


# --- ReLU -----------------------------------------------------------------
class ReLU(Layer):
    """out = max(x, 0), elementwise; the gradient passes where the output is positive."""
    kind = "relu"

    def forward(self, x, train=True):
        self.out = buffer_like(self.ws, "out", x)
        # one pass over the memory as one long row: NumPy is 2x slower on the 13-value rows of a map
        x_, out_ = flat_together(x, self.out)
        np.maximum(x_, 0, out=out_)
        return self.out

    def backward(self, dout, need_dx=True):
        dx = buffer_like(self.ws, "dx", dout)
        dout_, out_, dx_ = flat_together(dout, self.out, dx)
        np.multiply(dout_, out_ > 0, out=dx_)
        return dx


# --- 2x2 max-pool -----------------------------------------------------------
# out[n, c, p, q] = max over di, dj in {0, 1} of a[n, c, 2p + di, 2q + dj]
# with H_out = H // 2 (an odd last row or column is dropped, as PyTorch does).
# Only the winning input changed the output, so the backward hands each window's
# gradient to exactly one position.  When several tie (whole windows of a blank
# MNIST border are equal), it goes to the first in reading order (top-left,
# top-right, bottom-left, bottom-right).  Giving it to every tied position would
# multiply it, and no longer be the gradient of max.
class MaxPool(Layer):
    kind = "pool"
    pool_order = False                     # set by agree_on_pool_order()

    def forward(self, a, train=True):
        """a (N, C, H, W), or (4, C, N, Hp, Wp) in pool order -> out (N, C, Hp, Wp).

        The max is a small tournament: top-left vs top-right, bottom-left vs
        bottom-right, then the two winners.  Each match is won by the left or upper
        side unless the other is strictly greater, so a tie goes to the first position.
        """
        self.a_shape = a.shape
        tl, tr, bl, br = self.quarters(a)       # in pool order four whole blocks, else strided views
        ws, shape = self.ws, tl.shape
        if self.pool_order:
            # the blocks are (C, N, Hp, Wp); the output is stored image by image, (N, C, Hp, Wp),
            # so that a dense layer after it reads it without a copy
            C, N, Hp, Wp = shape
            top = buffer(ws, "top", (N, C, Hp, Wp), a.dtype).transpose(1, 0, 2, 3)
        else:
            top = buffer(ws, "top", shape, a.dtype)
        np.maximum(tl, tr, out=top)
        bottom = np.maximum(bl, br, out=buffer(ws, "bottom", shape, a.dtype))
        self.right_won_top = np.greater(tr, tl, out=buffer(ws, "rt", shape, bool))
        self.right_won_bottom = np.greater(br, bl, out=buffer(ws, "rb", shape, bool))
        self.bottom_won = np.greater(bottom, top, out=buffer(ws, "b", shape, bool))
        out = np.maximum(top, bottom, out=top)
        return out.transpose(1, 0, 2, 3) if self.pool_order else out   # pool order: (C, N, ..) -> (N, C, ..)

    def backward(self, dout, need_dx=True):
        """dout (N, C, Hp, Wp) -> da like the forward's input: each window's gradient to
        its winner only, back down the tournament (to the winning pair, then to the
        winner within the pair); every other position gets 0."""
        if self.pool_order:
            dout = dout.transpose(1, 0, 2, 3)                       # (C, N, Hp, Wp), like the blocks
            da = buffer(self.ws, "da", self.a_shape, dout.dtype)
        else:
            da = buffer(self.ws, "da", self.a_shape, dout.dtype, zero=True)   # a dropped odd row stays 0
        tl, tr, bl, br = self.quarters(da)
        to_bottom = np.multiply(dout, self.bottom_won, out=buffer(self.ws, "d", dout.shape, dout.dtype))
        to_top = np.subtract(dout, to_bottom, out=tl)               # dout where the top pair won
        np.multiply(to_top, self.right_won_top, out=tr)
        tl -= tr                                                    # what top-right did not take
        np.multiply(to_bottom, self.right_won_bottom, out=br)
        np.subtract(to_bottom, br, out=bl)
        return da

    def quarters(self, a):
        """The four positions of every window: (top-left, top-right, bottom-left, bottom-right)."""
        if self.pool_order:
            return a[0], a[1], a[2], a[3]
        Hp, Wp = a.shape[2] // 2, a.shape[3] // 2
        return tuple(a[:, :, di:2 * Hp:2, dj:2 * Wp:2] for di in (0, 1) for dj in (0, 1))


# --- Batch normalisation -----------------------------------------------------
# Per channel c (axis 1: the channel of a map, the feature of a dense layer's output),
# over the M values of the batch that belong to it (M = N*H*W for maps, N for features):
#   training:   mu = mean(x),  var = mean((x - mu)^2)  (biased: divided by M)
#               xhat = (x - mu) / sqrt(var + eps),  out = gamma * xhat + beta
#               running_mean += momentum * (mu - running_mean)
#               running_var  += momentum * (var * M / (M - 1) - running_var)   (unbiased, as PyTorch)
#   evaluation: xhat = (x - running_mean) / sqrt(running_var + eps), the batch plays no part.
# Backward (training), with g = dout:
#   dbeta = sum(g),  dgamma = sum(g * xhat)
#   dx = gamma / sqrt(var + eps) * (g - dbeta / M - xhat * dgamma / M)
# The last line is the chain rule through mu and var worked out: every x of the channel
# moved mu and var, so each dx also carries the mean gradient and the part along xhat.
# After an evaluation forward (running statistics, constants): dx = gamma / sqrt(running_var + eps) * g.
class BatchNorm(Layer):
    kind = "bn"

    def __init__(self, channels, momentum=0.1, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.shapes = {"weight": (channels,), "bias": (channels,)}     # gamma and beta
        self.buffers = {"running_mean": np.zeros(channels, dtype),
                        "running_var": np.ones(channels, dtype),
                        "num_batches_tracked": np.zeros((), np.int64)}

    def forward(self, x, train=True):
        """x with channels on axis 1: (N, C), (N, C, H, W) or (4, C, N, Hp, Wp) -> out, same shape."""
        x = per_channel_layout(x)
        out, xc = buffer_like(self.ws, "out", x), buffer_like(self.ws, "xc", x)
        x3, xc3, out3 = by_channel(x), by_channel(xc), by_channel(out)       # (B, C, P) views
        M = x3.shape[0] * x3.shape[2]                                        # values per channel
        if train:
            mean = channel_sums(x3) / M
            np.subtract(x3, mean[:, None], out=xc3)
            var = np.einsum("bcp,bcp->c", xc3, xc3) / M                     # sum of squares, no temporary
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm += self.momentum * (mean - rm)
            rv += self.momentum * (var * M / max(M - 1, 1) - rv)
            self.buffers["num_batches_tracked"] += 1
        else:
            np.subtract(x3, self.buffers["running_mean"][:, None].astype(x.dtype), out=xc3)
            var = self.buffers["running_var"]
        self.inv_std = (1 / np.sqrt(var + self.eps)).astype(x.dtype)
        self.xc3, self.M, self.out, self.train = xc3, M, out, train
        # out = gamma * xhat + beta with xhat = xc * inv_std: one scale per channel, then the shift
        np.multiply(xc3, (self.params["weight"] * self.inv_std)[:, None], out=out3)
        out3 += self.params["bias"][:, None]
        return out

    def backward(self, dout, need_dx=True):
        xc3, inv_std, M, gamma = self.xc3, self.inv_std, self.M, self.params["weight"]
        d3 = by_channel(per_channel_layout(dout))
        if d3.shape != xc3.shape:                    # dout is stored in another order than x was
            d = buffer_like(self.ws, "d", self.out)
            d[...] = dout
            d3 = by_channel(d)
        dbeta = channel_sums(d3)
        dgamma = np.einsum("bcp,bcp->c", d3, xc3) * inv_std                 # sum(dout * xhat)
        self.grads["weight"][...] = dgamma
        self.grads["bias"][...] = dbeta
        if not need_dx:
            return None
        # dx = gamma * inv_std * (dout - dbeta / M - xhat * dgamma / M), with xhat = xc * inv_std
        dx = buffer_like(self.ws, "dx", self.out)                           # stored like x
        dx3 = by_channel(dx)
        if not self.train:              # evaluation: mean and var are constants, out is linear in x
            np.multiply(d3, (gamma * inv_std)[:, None], out=dx3)
            return dx
        np.subtract(d3, (dbeta / M)[:, None], out=dx3)
        # xc is not needed after this step: it takes the xhat term in place (no 6 MB temporary)
        xc3 *= (inv_std * dgamma / M)[:, None]
        dx3 -= xc3
        dx3 *= (gamma * inv_std)[:, None]
        return dx


def per_channel_layout(x):
    """x itself if by_channel can view it without a copy, else a contiguous copy."""
    if x.ndim == 2 or x.flags.c_contiguous or (x.ndim == 4 and x.transpose(1, 0, 2, 3).flags.c_contiguous):
        return x
    return np.ascontiguousarray(x)


def by_channel(a):
    """a with channels on axis 1 seen as (B, C, P), a view: channel c's values are a3[:, c, :].

    (N, C) -> (N, C, 1); (N, C, H, W) stored image by image -> (N, C, H*W), stored
    channel by channel -> (1, C, N*H*W); pool order (4, C, N, Hp, Wp) -> (4, C, N*Hp*Wp).
    """
    if a.ndim == 2:
        return a[:, :, None]
    if a.flags.c_contiguous:
        return a.reshape(a.shape[0], a.shape[1], -1)
    return a.transpose(1, 0, 2, 3).reshape(1, a.shape[1], -1)


def channel_sums(a3):
    """(B, C, P) -> (C,): the sum over B and P, as a product with ones (BLAS: 1.3x faster)."""
    return (a3 @ np.ones(a3.shape[2], a3.dtype)).sum(axis=0)


# --- Dropout ------------------------------------------------------------------
# Inverted dropout: in training each value is kept with probability 1 - P and
# then scaled by 1/(1 - P), so the expected output equals the input; in
# evaluation the layer passes x through unchanged.  The mask is drawn fresh every
# step from the run's one seeded generator, so a run is repeatable.
class Dropout(Layer):
    kind = "dropout"

    def __init__(self, p, rng):
        super().__init__()
        self.p, self.rng = p, rng

    def forward(self, x, train=True):
        self.active = train and self.p > 0
        if not self.active:
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        self.mask = keep.astype(x.dtype) * x.dtype.type(1 / (1 - self.p))  # 0 or 1/(1-P)
        return x * self.mask

    def backward(self, dout, need_dx=True):
        return dout * self.mask if self.active else dout


# --- Flatten --------------------------------------------------------------------
class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), each image in (channel, row, column) order, as PyTorch's
    Flatten does.  Put in by the network before a dense layer that follows a map."""
    kind = "flatten"

    def forward(self, x, train=True):
        self.x_shape = x.shape
        N = len(x)
        if x.flags.c_contiguous:
            return x.reshape(N, -1)                                 # already image by image: a view
        flat = buffer(self.ws, "out", (N, x[0].size), x.dtype)
        flat.reshape(x.shape)[...] = x                              # maps stored channel by channel
        return flat

    def backward(self, dout, need_dx=True):
        return dout.reshape(self.x_shape)


# --- Dense (fully connected) ------------------------------------------------
class Dense(Layer):
    """out = x @ w.T + b: x (N, D), w (M, D), b (M,) -> (N, M)."""
    kind = "fc"

    def __init__(self, inputs, units):
        super().__init__()
        self.shapes = {"weight": (units, inputs), "bias": (units,)}
        self.fan_in = inputs

    def forward(self, x, train=True):
        self.x = x
        M = self.shapes["bias"][0]
        out = np.matmul(x, self.params["weight"].T, out=buffer(self.ws, "out", (len(x), M), x.dtype))
        out += self.params["bias"]
        return out

    def backward(self, dout, need_dx=True):
        """dx = dout @ w, dw = dout.T @ x, db = dout summed over the batch."""
        np.matmul(dout.T, self.x, out=self.grads["weight"])
        self.grads["bias"][...] = dout.sum(axis=0)
        return dout @ self.params["weight"] if need_dx else None


# --- Softmax cross-entropy ----------------------------------------------------
def log_softmax(logits):
    """logits z (N, 10) -> log p (N, 10), p = softmax(z) = exp(z) / sum(exp(z)) per row.

    1) Subtract each row's max: softmax is unchanged, and exp can no longer overflow.
    2) log p = z - log(sum(exp(z))) (log-sum-exp): never the log of a probability
       that underflowed to 0.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)                       # 1)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))        # 2)


def softmax_cross_entropy(logits, y):
    """logits (N, 10), labels y (N,) -> (mean loss over the batch, dlogits (N, 10)).

    loss = -mean over n of log p[n, y_n], with log p from log_softmax (stable).
    The gradient of the mean loss is (p - onehot(y)) / N: the 1/N because the
    loss is a mean over the batch, not a sum.
    """
    N = len(y)
    log_p = log_softmax(logits)
    rows = np.arange(N)
    loss = -log_p[rows, y].mean()
    dlogits = np.exp(log_p)
    dlogits[rows, y] -= 1
    dlogits /= N
    return float(loss), dlogits


# ---------------------------------------------------------------------------
# 3. The network: a list of layers, written in a one-line grammar.
# ---------------------------------------------------------------------------
# --net takes the layers in order, separated by spaces or commas:
#   convF      3x3 convolution to F maps, stride 1, no padding, with bias
#   convFxK    a KxK kernel;  a trailing pP adds P pixels of zero padding: conv16p1, conv16x5p2
#   bn         batch normalisation (per channel after a conv, per feature after a dense layer)
#   relu       max(x, 0)
#   pool       2x2 max-pool, stride 2 (an odd last row or column is dropped)
#   dropoutP   inverted dropout with drop probability P, training only: dropout0.5
#   fcM        dense layer to M units (a map is flattened first, in (channel, row, column) order)
PRESETS = {
    "seed": "conv8 relu pool fc128 relu fc10",    # the original network (--filters, --hidden change it)
    "deep": "conv16p1 bn relu pool conv32p1 bn relu pool fc128 relu fc10",   # 99.3% in 5 epochs
}
CLASSES = 10
INPUT_SHAPE = (1, 28, 28)     # (C, H, W) of one image


class SpecError(ValueError):
    """A --net spec that does not describe a network; the message names the token."""


def parse_layer(token):
    """One token of the grammar -> (kind, numbers), or SpecError saying what is wrong."""
    if token in ("bn", "relu", "pool"):
        return token, ()
    for kind, pattern, example in (("conv", r"conv(\d+)(?:x(\d+))?(?:p(\d+))?", "conv16, conv16x5, conv16p1"),
                                   ("fc", r"fc(\d+)", "fc128")):
        if token.startswith(kind):
            m = re.fullmatch(pattern, token)
            if not m:
                raise SpecError(f"{token!r}: the numbers must be positive whole numbers (e.g. {example})")
            numbers = [int(g) if g is not None else None for g in m.groups()]
            if any(n == 0 for n in numbers[:2]):
                raise SpecError(f"{token!r}: {kind} sizes must be positive whole numbers, not 0")
            return kind, tuple(numbers)
    if token.startswith("dropout"):
        try:
            p = float(token[len("dropout"):])
        except ValueError:
            raise SpecError(f"{token!r}: dropout takes a drop probability, e.g. dropout0.5") from None
        if not 0 <= p < 1:
            raise SpecError(f"{token!r}: the drop probability must be at least 0 and below 1")
        return "dropout", (p,)
    raise SpecError(f"{token!r}: unknown layer; the layers are convF[xK][pP], bn, relu, pool, "
                    "dropoutP, fcM")


def spec_tokens(spec):
    tokens = [t for t in re.split(r"[,\s]+", PRESETS.get(spec.strip(), spec).strip()) if t]
    if not tokens:
        raise SpecError("the network is empty; e.g. --net seed or --net 'conv8 relu pool fc10'")
    return tokens


def build_layers(spec, rng, dtype=np.float32, in_shape=INPUT_SHAPE):
    """The layers a spec describes, each checked against the shape it receives.

    Returns [(token, layer, shape after it)]; a Flatten goes in before a dense
    layer that follows a map.  Raises SpecError naming the first bad token.
    """
    layers, shape = [], in_shape
    tokens = spec_tokens(spec)
    for token in tokens:
        kind, numbers = parse_layer(token)
        is_map = len(shape) == 3
        if kind in ("conv", "pool") and not is_map:
            raise SpecError(f"{token!r} after an fc: a {kind} needs a map; put it before the first fc")
        if kind == "conv":
            F, K, pad = numbers[0], numbers[1] or 3, numbers[2] or 0
            C, H, W = shape
            if K > H + 2 * pad or K > W + 2 * pad:
                raise SpecError(f"{token!r}: its {K}x{K} kernel is larger than its input map "
                                f"{H}x{W}" + (f" padded by {pad}" if pad else ""))
            layer, shape = Conv(C, F, K, pad), (F, H + 2 * pad - K + 1, W + 2 * pad - K + 1)
        elif kind == "pool":
            C, H, W = shape
            if H < 2 or W < 2:
                raise SpecError(f"{token!r}: a 2x2 pool needs a map of at least 2x2, it gets {H}x{W}")
            layer, shape = MaxPool(), (C, H // 2, W // 2)
        elif kind == "fc":
            if is_map:
                layers.append(("flatten", Flatten(), (math.prod(shape),)))
                shape = (math.prod(shape),)
            layer, shape = Dense(shape[0], numbers[0]), (numbers[0],)
        elif kind == "bn":
            layer = BatchNorm(shape[0], dtype=dtype)
        elif kind == "relu":
            layer = ReLU()
        else:
            layer = Dropout(numbers[0], rng)
        layers.append((token, layer, shape))
    if len(shape) == 3:
        raise SpecError(f"the map {shape} after {tokens[-1]!r} reaches the end without an fc: "
                        f"end with fc{CLASSES}")
    if tokens[-1] != f"fc{CLASSES}":
        raise SpecError(f"{tokens[-1]!r} is last: the last layer must be fc{CLASSES}, one score per class")
    return layers


def agree_on_pool_order(layers):
    """The one speed agreement between layers; returns the order to run them in.

    1) A conv whose maps reach a 2x2 pool through only ReLU, batch norm or dropout hands
       them over in pool order (4, F, N, H/2, W/2), the four positions of every window as
       four whole blocks (see the convolution).  It saves the pool picking every other
       value out of (N, F, H, W): 154 instead of 1,045 us forward per batch of 128 for the
       seed network.  The layers between do not notice: ReLU and dropout treat every
       value alike, and batch norm works per channel on axis 1, the channel in both
       layouts.  Needs an even conv output.
    2) Such a pool runs before a ReLU right in front of it: the max of a window of
       relu(z) is relu of the max of z (ReLU never changes which value is largest), and
       the gradient is the same too (the winner gets dout where it is positive, else no
       one does).  The ReLU then touches 4x fewer values: 10% of a seed training step.
    """
    run = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, Conv):
            continue
        j = i + 1
        while j < len(layers) and isinstance(layers[j], (ReLU, BatchNorm, Dropout)):
            j += 1
        if j < len(layers) and isinstance(layers[j], MaxPool) and layer.out_even:
            layer.pool_order = layers[j].pool_order = True                      # 1)
            if isinstance(layers[j - 1], ReLU):
                run[j - 1], run[j] = layers[j], layers[j - 1]                   # 2)
    return run


class Network:
    """The layers in order; all parameters in one flat vector, all gradients in another
    (the optimizers update one array); forward walks the list, backward walks it back.

    net.state: name -> array, PyTorch's state_dict names numbered by kind in order of
    appearance (conv1.weight, conv1.bias, bn1.weight, bn1.running_mean, ..., fc2.bias);
    net.params and net.grads: the same names, parameters only (views into the flat vectors).
    """

    def __init__(self, spec, rng, dtype=np.float32, agree=True):
        built = build_layers(spec, rng, dtype)
        self.spec = " ".join(token for token, _, _ in built if token != "flatten")
        self.tokens = [token for token, _, _ in built]
        self.layers = [layer for _, layer, _ in built]
        self.shapes = [shape for _, _, shape in built]
        for layer, shape in zip(self.layers, self.shapes):        # an even map can be cut in 2x2 windows
            layer.out_even = len(shape) == 3 and shape[1] % 2 == 0 and shape[2] % 2 == 0
        # agree=False skips the speed agreement: every layer then sees (N, C, H, W) maps,
        # as the tools that show a network's insides want (same numbers, slower)
        self.run_order = agree_on_pool_order(self.layers) if agree else list(self.layers)
        # the input gradient is worth computing only where some layer below learns
        self.learns_below = [any(l.shapes for l in self.run_order[:i]) for i in range(len(self.run_order))]
        # state names: conv1, bn1, fc1, fc2, ... numbered by kind
        counts, self.named = {}, []
        for layer in self.layers:
            if layer.shapes:
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
                self.named.append((f"{layer.kind}{counts[layer.kind]}", layer))
        sizes = [math.prod(s) for _, layer in self.named for s in layer.shapes.values()]
        self.flat = np.empty(sum(sizes), dtype)
        self.grad = np.zeros(sum(sizes), dtype)
        self.decay_mask = np.zeros(sum(sizes), bool)       # the weights AdamW decays
        self.params, self.grads, self.state, start = {}, {}, {}, 0
        for prefix, layer in self.named:
            for pname, shape in layer.shapes.items():
                size = math.prod(shape)
                layer.params[pname] = self.flat[start:start + size].reshape(shape)
                layer.grads[pname] = self.grad[start:start + size].reshape(shape)
                self.decay_mask[start:start + size] = pname == "weight" and layer.kind != "bn"
                self.params[f"{prefix}.{pname}"] = self.state[f"{prefix}.{pname}"] = layer.params[pname]
                self.grads[f"{prefix}.{pname}"] = layer.grads[pname]
                start += size
            for bname, value in layer.buffers.items():
                self.state[f"{prefix}.{bname}"] = value
        self.init_params(rng)

    def init_params(self, rng):
        """PyTorch's defaults: conv and dense w, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        fan_in = the inputs one output unit sees (C*K*K for a conv, D for a dense layer);
        batch norm starts as the identity, gamma = 1 and beta = 0."""
        for _, layer in self.named:
            for pname, p in layer.params.items():
                if layer.kind == "bn":
                    p[...] = 1.0 if pname == "weight" else 0.0
                else:
                    bound = 1 / math.sqrt(layer.fan_in)
                    p[...] = rng.uniform(-bound, bound, p.shape)

    def forward(self, x, train=True):
        """x (N, 1, 28, 28) -> logits (N, 10).  train=False: batch norm uses its running
        statistics and dropout passes everything (PyTorch's eval())."""
        for layer in self.run_order:
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits, input_grad=False):
        """dlogits (N, 10) -> fills self.grad; returns dx (N, 1, 28, 28) if input_grad."""
        dout = dlogits
        for i in reversed(range(len(self.run_order))):
            dout = self.run_order[i].backward(dout, need_dx=input_grad or self.learns_below[i])
            if dout is None:                      # nothing below this layer learns
                break
        return dout

    def describe(self):
        """Start-up lines: the spec as one copyable line, then each layer's output shape."""
        lines = [f"network --net \"{self.spec}\"",
                 f"  {'input':18s} {INPUT_SHAPE}"]
        names = {id(layer): prefix for prefix, layer in self.named}
        for token, layer, shape in zip(self.tokens, self.layers, self.shapes):
            count = sum(math.prod(s) for s in layer.shapes.values())
            label = f"{token} ({names[id(layer)]})" if id(layer) in names else token
            lines.append(f"  {label:18s} {shape}" if not count else
                         f"  {label:18s} {str(shape):16s}{count:>9,} parameters")
        lines.append(f"  {self.flat.size:,} parameters in all")
        return lines


def loss_and_grads(net, x, y):
    """One training step's maths: mean loss and the batch's logits; gradients in net.grad."""
    logits = net.forward(x, train=True)
    loss, dlogits = softmax_cross_entropy(logits, y)
    net.backward(dlogits)
    return loss, logits


def predict_proba(net, images_u8, batch=EVAL_BATCH):
    """Softmax probabilities (N, 10) for uint8 images, a batch at a time, in evaluation mode."""
    probs = np.empty((len(images_u8), CLASSES), np.float32)
    for i in range(0, len(images_u8), batch):
        logits = net.forward(to_input(images_u8[i:i + batch]), train=False)
        probs[i:i + batch] = np.exp(log_softmax(logits))
    return probs


# ---------------------------------------------------------------------------
# 4. Optimizers: each keeps its own state per parameter (here, per element of
#    the flat parameter vector) and turns a gradient into an update.
# ---------------------------------------------------------------------------
class Adam:
    """Adam (Kingma and Ba, 2015): a per-parameter step from running moments of the gradient."""

    def __init__(self, size, lr=ADAM_LR, betas=ADAM_BETAS, eps=ADAM_EPS, dtype=np.float32):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.m = np.zeros(size, dtype)      # running mean of g
        self.v = np.zeros(size, dtype)      # running mean of g*g
        self.t = 0
        self._tmp = np.empty(size, dtype)

    def update(self, g, lr_scale=1.0):
        """The change to add to the parameters for gradient g."""
        self.t += 1
        b1, b2, tmp = self.beta1, self.beta2, self._tmp
        # Every line below is one pass over all the parameters, written into kept arrays
        # (out=, in place): a temporary array per operation would cost as much again.
        # 1) m = b1*m + (1-b1)*g
        self.m *= b1
        np.multiply(g, 1 - b1, out=tmp)
        self.m += tmp
        #    v = b2*v + (1-b2)*g^2
        self.v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - b2
        self.v += tmp
        # 2) step = -lr * m_hat / (sqrt(v_hat) + eps), with the bias corrections toward 0 of
        #    moments that started at 0: m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).
        #    The corrections are moved onto the scalars, as in the Adam paper's faster
        #    ordering, but with eps scaled too, so the step is exactly the same, in fewer
        #    passes: sqrt(v_hat) + eps = (sqrt(v) + eps*c) / c with c = sqrt(1 - b2^t).
        c = math.sqrt(1 - b2 ** self.t)
        np.sqrt(self.v, out=tmp)
        tmp += self.eps * c
        np.divide(self.m, tmp, out=tmp)
        tmp *= -self.lr * lr_scale * c / (1 - b1 ** self.t)
        return tmp


class AdamW(Adam):
    """AdamW (Loshchilov and Hutter, 2019): Adam plus decoupled weight decay.

    3) step += -lr * weight_decay * w, for the weights of convs and dense layers only
       (decay_mask; not biases or batch norm's gamma and beta).  The decay is kept out of
       the gradient, so Adam's per-parameter scaling does not weaken it where gradients
       are large (which is what adding weight_decay * w to g, "L2", would do).
    """

    def __init__(self, params_flat, decay_mask, lr=ADAM_LR, weight_decay=WEIGHT_DECAY, dtype=np.float32):
        super().__init__(params_flat.size, lr, dtype=dtype)
        self.params = params_flat
        self.decay = decay_mask.astype(dtype) * weight_decay

    def update(self, g, lr_scale=1.0):
        step = super().update(g, lr_scale)
        step -= (self.lr * lr_scale) * self.decay * self.params          # 3)
        return step


class Momentum:
    """SGD with momentum, as PyTorch writes it: velocity = mu*velocity + g, step = -lr*velocity."""

    def __init__(self, size, lr=SGD_LR, momentum=MOMENTUM, dtype=np.float32):
        self.lr, self.mu = lr, momentum
        self.velocity = np.zeros(size, dtype)
        self._tmp = np.empty(size, dtype)

    def update(self, g, lr_scale=1.0):
        self.velocity *= self.mu                       # 1) velocity = mu*velocity + g
        self.velocity += g
        return np.multiply(self.velocity, -self.lr * lr_scale, out=self._tmp)  # 2)


class Dual:
    """The original script's optimizer: Adam's and momentum's updates, both from the
    same gradient, both added each step.  Each part keeps its own state."""

    def __init__(self, size, adam_lr=ADAM_LR, sgd_lr=SGD_LR, momentum=MOMENTUM, dtype=np.float32):
        self.adam = Adam(size, adam_lr, dtype=dtype)
        self.momentum = Momentum(size, sgd_lr, momentum, dtype=dtype)

    def update(self, g, lr_scale=1.0):
        step = self.adam.update(g, lr_scale)
        step += self.momentum.update(g, lr_scale)
        return step


def make_optimizer(name, net, adam_lr=ADAM_LR, sgd_lr=SGD_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY):
    size = net.flat.size
    if name == "adam":
        return Adam(size, adam_lr)
    if name == "adamw":
        return AdamW(net.flat, net.decay_mask, adam_lr, weight_decay)
    if name == "momentum":
        return Momentum(size, sgd_lr, momentum)
    return Dual(size, adam_lr, sgd_lr, momentum)


def cosine_scale(step, total_steps):
    """Learning-rate factor: 1 at the first step, falling along half a cosine to 0 at the end."""
    return 0.5 * (1 + math.cos(math.pi * step / total_steps))


# ---------------------------------------------------------------------------
# 5. Training and evaluation.
# ---------------------------------------------------------------------------
class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: the steps were too large."""


def train_epoch(net, opt, train_x, train_y, batch_size, rng, step0, total_steps,
                schedule="cosine", progress=None):
    """One pass over the training set in a fresh random order.

    Returns (mean loss over the epoch, training accuracy, steps taken).
    Every example is used exactly once: the order is a permutation, not sampling.
    """
    n = len(train_x)
    order = rng.permutation(n)                # shuffles indices; the caller's data stay as they are
    x_buf = np.empty((batch_size,) + INPUT_SHAPE, net.flat.dtype)
    loss_sum, correct, step = 0.0, 0, step0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = to_input(train_x[idx], out=x_buf[:len(idx)])
        y = train_y[idx]
        loss, logits = loss_and_grads(net, x, y)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at step {step + 1}")
        scale = cosine_scale(step, total_steps) if schedule == "cosine" else 1.0
        net.flat += opt.update(net.grad, scale)
        step += 1
        loss_sum += loss * len(idx)
        correct += int((logits.argmax(axis=1) == y).sum())
        if progress:
            progress(start + len(idx), n, loss_sum / (start + len(idx)))
    return loss_sum / n, correct / n, step - step0


def evaluate(net, images, labels):
    """(accuracy, predictions, probabilities) on a labelled set, in evaluation mode."""
    probs = predict_proba(net, images)
    pred = probs.argmax(axis=1)
    return float((pred == labels).mean()), pred, probs


def confusion_matrix(pred, labels):
    """counts[true, predicted]."""
    counts = np.zeros((CLASSES, CLASSES), np.int64)
    np.add.at(counts, (labels.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


def train(args, data, out=print):
    """Build the network, train it as `args` says.  Returns the network, a list
    with one dict per epoch (loss, accuracies, seconds) and the last epoch's test
    evaluation (accuracy, predictions, probabilities), so nobody runs it twice."""
    train_x, train_y, test_x, test_y = data
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    rng = np.random.default_rng(args.seed)      # the run's one generator: weights, order, dropout
    net = Network(args.net, rng)
    opt = make_optimizer(args.optimizer, net, args.lr, args.sgd_lr, args.momentum, args.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if not args.quiet:
        for line in net.describe():
            out(line)
        out(f"Training on {len(train_x)} images ({steps_per_epoch} steps of {args.batch_size} per epoch), "
            f"testing on {len(test_x)}; optimizer {args.optimizer}, {args.schedule} learning rate")
    step, history = 0, []
    for epoch in range(1, args.epochs + 1):
        progress = None if args.quiet else ProgressLine(f"epoch {epoch}/{args.epochs}")
        t0 = time.perf_counter()
        # a blow-up is reported in plain words by train_epoch's finite-loss check,
        # not by NumPy's overflow warnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss, train_acc, taken = train_epoch(net, opt, train_x, train_y, args.batch_size,
                                                 rng, step, total_steps, args.schedule, progress)
        step += taken
        evaluation = evaluate(net, test_x, test_y)
        test_acc = evaluation[0]
        seconds = time.perf_counter() - t0
        if progress:
            progress.clear()
        history.append({"epoch": epoch, "loss": loss, "train_accuracy": train_acc,
                        "test_accuracy": test_acc, "seconds": seconds})
        if not args.quiet:
            out(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  train acc {100 * train_acc:.2f}%  "
                f"test acc {100 * test_acc:.2f}%  {seconds:.1f} s")
    return net, history, evaluation


class ProgressLine:
    """A live one-line progress report, redrawn in place at most 10 times a second.

    Printed only to a terminal: in a log file it would be thousands of lines.
    """

    def __init__(self, label, stream=sys.stdout):
        self.label, self.stream = label, stream
        self.active = stream.isatty()
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done, total, loss):
        now = time.perf_counter()
        if not self.active or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (total - done) / rate
        self.stream.write(f"\r{self.label}  {done}/{total}  {rate:,.0f} img/s  "
                          f"ETA {eta:.1f} s  loss {loss:.4f}   ")
        self.stream.flush()

    def clear(self):
        if self.active:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()



# ---------------------------------------------------------------------------
# 6. Saving results: the predictions log and the model file.
# ---------------------------------------------------------------------------
def write_atomically(path, write):
    """Call write(f) on a temporary file beside `path`, then rename it over `path`.

    An interrupted or failing run leaves the previous file as it was, never half a file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def log_text(pred, labels, header_lines):
    """The predictions log: '#' header lines, then 'prediction actual' per test image."""
    lines = [f"# {h}" for h in header_lines]
    lines.append("# prediction actual")
    lines += [f"{p} {a}" for p, a in zip(pred.tolist(), labels.tolist())]
    return "\n".join(lines) + "\n"


def save_model(path, net, config, dataset="mnist"):
    """An .npz with the spec, every parameter and buffer under PyTorch's state_dict names
    and layouts (conv1.weight, bn1.running_mean, fc2.bias, ...), the data set it was
    trained on (its --dataset name), the input scaling it was trained with and the config."""
    arrays = dict(net.state)
    arrays["spec"] = np.array(net.spec)
    arrays["dataset"] = np.array(dataset)
    arrays["input_mean"] = np.float32(input_mean)
    arrays["input_std"] = np.float32(input_std)
    arrays["config"] = np.array(config)
    write_atomically(path, lambda f: np.savez(f, **arrays))


# the names this program used before networks were lists of layers (one conv, two dense)
LEGACY_NAMES = {"conv.weight": "conv1.weight", "conv.bias": "conv1.bias"}


def read_model_file(path):
    """Every array of a model file, by name; ModelFileError if it is not a readable .npz."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as e:
        raise ModelFileError(f"{path}: not a readable .npz model file ({type(e).__name__}: {e})") from None


def model_inputs(path, stored=None):
    """(data set, input mean, input std) a model file was trained with.  A file from
    before --dataset has no data set field: it was trained on MNIST."""
    stored = read_model_file(path) if stored is None else stored
    key = str(stored["dataset"]) if "dataset" in stored else "mnist"
    if key not in DATASETS:
        raise ModelFileError(f"{path}: trained on an unknown data set {key!r} "
                             f"(this program knows {', '.join(DATASETS)})")
    for name in ("input_mean", "input_std"):
        if name not in stored:
            raise ModelFileError(f"{path}: not an mnist_net model, missing {name}")
        a = stored[name]
        if a.ndim != 0 or not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a):
            raise ModelFileError(f"{path}: {name} is not a finite number")
    if stored["input_std"] <= 0:
        raise ModelFileError(f"{path}: input_std is {stored['input_std']}, not a positive number")
    return DATASETS[key], float(stored["input_mean"]), float(stored["input_std"])


def load_model(path):
    """The network a file from save_model holds; raises ModelFileError saying what is wrong.
    (model_inputs tells the data set and input scaling it was trained with.)"""
    stored = read_model_file(path)
    if "spec" not in stored and "conv.bias" in stored:
        # a file from before --net: the seed network, its widths read off the arrays
        for name in ("conv.bias", "fc1.bias"):
            if name not in stored or stored[name].ndim != 1:
                raise ModelFileError(f"{path}: {name} is {'missing' if name not in stored else 'not a vector'}: "
                                     "not a model file this program (or its previous version) wrote")
        stored = {LEGACY_NAMES.get(k, k): v for k, v in stored.items()}
        stored["spec"] = np.array(seed_spec(stored["conv1.bias"].shape[0], stored["fc1.bias"].shape[0]))
    missing = [n for n in ("spec", "input_mean", "input_std") if n not in stored]
    if missing:
        raise ModelFileError(f"{path}: not an mnist_net model, missing {', '.join(missing)}")
    try:
        net = Network(str(stored["spec"]), np.random.default_rng(0))
    except SpecError as e:
        raise ModelFileError(f"{path}: its network spec is not valid ({e})") from None
    model_inputs(path, stored)          # its data set and input scaling must be readable too
    missing = [name for name in net.state if name not in stored]
    if missing:
        raise ModelFileError(f"{path}: missing {', '.join(missing)} for the network \"{net.spec}\"")
    for name, target in net.state.items():
        a = stored[name]
        counter = name.endswith("num_batches_tracked")
        kind, word = (np.integer, "integers") if counter else (np.floating, "floats")
        if not np.issubdtype(a.dtype, kind) or not np.all(np.isfinite(a)):
            raise ModelFileError(f"{path}: {name} is not an array of finite {word}")
        if a.shape != target.shape:
            raise ModelFileError(f"{path}: {name} has shape {a.shape}, expected {target.shape} "
                                 f"for the network \"{net.spec}\"")
        target[...] = a
    return net


# ---------------------------------------------------------------------------
# 7. Command line.
# ---------------------------------------------------------------------------
def checked(convert, ok, rule):
    """An argparse type: convert the text, then refuse a value for which ok(value) is false."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            kind = "a whole number" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive whole number")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
momentum_value = checked(float, lambda v: 0 <= v < 1, "at least 0 and below 1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="mnist_net.py",
        description="Train a small CNN on MNIST (or Fashion-MNIST) in NumPy, print the test "
                    "accuracy and write every test prediction to a log.")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS,
                   help="passes over the training set (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per training step (default: {BATCH_SIZE}; {DEEP_BATCH_SIZE} with --net deep)")
    p.add_argument("--net", metavar="SPEC", default=None,
                   help="the layers in order, e.g. \"conv8 relu pool fc128 relu fc10\", or a preset: "
                        + ", ".join(f"{name} ({spec})" for name, spec in PRESETS.items())
                        + " (default: seed)")
    p.add_argument("--optimizer", choices=("dual", "adam", "adamw", "momentum"), default="dual",
                   help="dual adds Adam's and momentum's updates each step, as the original did; "
                        "adamw is Adam with decoupled weight decay (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=ADAM_LR,
                   help="Adam's learning rate, used by adam, adamw and dual (default: %(default)s)")
    p.add_argument("--weight-decay", type=checked(float, lambda v: math.isfinite(v) and v >= 0, "0 or more"),
                   default=WEIGHT_DECAY,
                   help="adamw's decay of conv and dense weights per step, times the learning rate "
                        "(default: %(default)s)")
    p.add_argument("--sgd-lr", type=positive_float, default=SGD_LR,
                   help="learning rate of SGD with momentum, used by momentum and dual "
                        "(default: %(default)s)")
    p.add_argument("--momentum", type=momentum_value, default=MOMENTUM,
                   help="momentum of the SGD part (default: %(default)s)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine decays both learning rates to 0 over all steps (default: %(default)s)")
    p.add_argument("--seed", type=checked(int, lambda v: v >= 0, "a whole number, 0 or more"), default=SEED,
                   help="seed for the initial weights and the shuffling (default: %(default)s)")
    p.add_argument("--filters", type=positive_int, default=None,
                   help=f"conv filters of the seed network (default: {FILTERS})")
    p.add_argument("--hidden", type=positive_int, default=None,
                   help=f"units of the seed network's hidden dense layer (default: {HIDDEN})")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="train on the first N training images only (default: all)")
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None,
                   help="mnist: handwritten digits; fashion: Fashion-MNIST, 10 kinds of clothing in the "
                        "same format, much harder (default: mnist; with --load-model, the model's)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the data set's four IDX files (default: mnist_data/ next to this "
                        "script, mnist_data/fashion/ for Fashion-MNIST)")
    fetching = p.add_mutually_exclusive_group()
    fetching.add_argument("--no-download", action="store_true",
                          help="never use the network; stop if a data file is missing (default: %(default)s)")
    fetching.add_argument("--download-only", action="store_true",
                          help="fetch and verify the four files, print their SHA-256, exit "
                               "(default: %(default)s)")
    p.add_argument("--log-file", default=LOG_FILE,
                   help="where to write every test prediction (default: %(default)s)")
    p.add_argument("--save-model", metavar="PATH.npz", default=None,
                   help="save the trained weights to this .npz file (default: do not save)")
    p.add_argument("--load-model", metavar="PATH.npz", default=None,
                   help="skip training: evaluate weights saved by --save-model (default: train)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the final results (default: %(default)s)")
    looks = p.add_argument_group("looking inside (see README)")
    looks.add_argument("--gradcheck", action="store_true",
                       help="check every backward pass against finite differences, then exit "
                            "(default: %(default)s)")
    looks.add_argument("--show-mistakes", type=positive_int, metavar="N", default=0,
                       help="draw N misclassified test digits in the terminal (default: none)")
    looks.add_argument("--show-filters", action="store_true",
                       help="draw the learned conv filters in the terminal (default: %(default)s)")
    looks.add_argument("--history", metavar="PATH.csv", default=None,
                       help="write per-epoch loss, accuracies and seconds as CSV (default: none)")
    looks.add_argument("--plot", metavar="PATH.png", default=None,
                       help="draw curves, filters and mistakes to a PNG (with --show-maps or --why, their "
                            "figure instead); needs matplotlib (default: none)")
    looks.add_argument("--predict", metavar="IMAGE", nargs="+", default=None,
                       help="with --load-model: classify your own digit pictures (PGM, .npy; PNG and "
                            "JPEG with Pillow) (default: none)")
    looks.add_argument("--show-maps", type=checked(int, lambda v: v >= 0, "0 or more"), metavar="I",
                       default=None,
                       help="draw test image I and the maps after every layer (with --predict, picture I "
                            "of the list, from 0); with --plot, as the PNG's figure (default: %(default)s)")
    looks.add_argument("--why", type=checked(int, lambda v: v >= 0, "0 or more"), metavar="I", default=None,
                       help="saliency: the gradient of the predicted class's and the runner-up's scores "
                            "w.r.t. the pixels of test image I (with --predict, picture I) "
                            "(default: %(default)s)")
    looks.add_argument("--trace", type=checked(int, lambda v: v >= 0, "0 or more"), metavar="I", nargs="?",
                       const=0, default=None,
                       help="after training (or with --load-model): follow test image I (0 if left out) "
                            "forward and backward through the network, with numbers to check by hand "
                            "(default: %(default)s)")
    looks.add_argument("--diagnose", action="store_true",
                       help="train a fresh network with this run's recipe for a few hundred steps, report "
                            "the first loss, activations, dead ReLUs, gradient and update sizes and whether "
                            "100 examples can be overfit, name the problems found, then exit "
                            "(default: %(default)s)")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = DEEP_BATCH_SIZE if (args.net or "").strip() == "deep" else BATCH_SIZE
    args.net = network_spec(args, p)
    for flag, path in (("--log-file", args.log_file), ("--save-model", args.save_model),
                       ("--history", args.history), ("--plot", args.plot)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not path or os.path.isdir(path):
            p.error(f"{flag} {path!r}: give a file name, not a folder")
        if not os.path.isdir(folder):
            p.error(f"{flag} {path}: folder {folder} does not exist; create it or pick another path")
        if not os.access(folder, os.W_OK):
            p.error(f"{flag} {path}: folder {folder} is not writable; pick another path")
    if args.data_dir is not None and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: is a file, not a folder")
    if args.save_model is not None and not args.save_model.endswith(".npz"):
        p.error(f"--save-model {args.save_model}: the file name must end in .npz")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        p.error(f"--load-model {args.load_model}: no such file")
    if args.predict and not args.load_model:
        p.error("--predict needs --load-model PATH.npz (train and save one first with --save-model)")
    for flag, i in (("--show-maps", args.show_maps), ("--why", args.why)):
        if args.predict and i is not None and i >= len(args.predict):
            n = len(args.predict)
            p.error(f"{flag} {i}: with --predict, I counts its pictures from 0, and there "
                    + ("is 1" if n == 1 else f"are {n}"))
    if args.history and args.load_model:
        p.error("--history records training: it does not go with --load-model")
    if args.trace is not None and args.predict:
        p.error("--trace follows a test image (it needs its label): it does not go with --predict")
    if args.diagnose and (args.load_model or args.save_model or args.trace is not None):
        p.error("--diagnose trains a fresh network for a few hundred steps, reports and exits: "
                "it does not go with --load-model, --save-model or --trace")
    return args


def seed_spec(filters=FILTERS, hidden=HIDDEN):
    """The original network with its two widths."""
    return f"conv{filters} relu pool fc{hidden} relu fc{CLASSES}"


def network_spec(args, parser):
    """--net (a preset or a spec; --filters and --hidden go with seed) checked by building
    the network once; a bad spec stops here with one line naming the token (exit 2)."""
    spec = "seed" if args.net is None else args.net
    if spec.strip() == "seed":
        spec = seed_spec(args.filters or FILTERS, args.hidden or HIDDEN)
    elif args.filters or args.hidden:
        parser.exit(2, f"{parser.prog}: error: --filters and --hidden change the seed network; "
                       f"write the widths into --net instead (e.g. conv16 ... fc256)\n")
    try:
        return Network(spec, np.random.default_rng(0)).spec
    except SpecError as e:
        parser.exit(2, f"{parser.prog}: error: --net: {e}\n")


def first_conv_weight(net):
    """The first conv's weights (F, 1, KH, KW), for the filter pictures; None without a conv."""
    return net.state.get("conv1.weight")


def fetch_missing_files(data_dir, dataset="mnist"):
    """Fetch whichever of the data set's four files data_dir lacks (see tools/fetch_data.py)."""
    missing = [name for name in IDX_NAMES.values() if find_idx_file(data_dir, name) is None]
    if missing:
        fetch_data.fetch_missing(data_dir, missing, dataset=dataset)


def download_only(data_dir, dataset, out=print):
    """--download-only: fetch what is missing, then list the four files with their SHA-256."""
    fetch_missing_files(data_dir, dataset.key)
    paths = {name: find_idx_file(data_dir, name) for name in IDX_NAMES.values()}
    lines = fetch_data.describe_files(paths, read_idx_bytes, dataset.key)
    for line in lines:
        out(line)
    return 0 if all(line.endswith(f"canonical {dataset.title}") for line in lines) else 1


def data_set_of_run(args):
    """This run's data set, with to_input set to its scaling: --dataset's (MNIST by default),
    or with --load-model the one the model was trained on, scaled with the mean and std the
    file recorded.  A model of another data set than the one --dataset names is refused."""
    if not args.load_model:
        dataset = DATASETS[args.dataset or "mnist"]
        use_input_scaling(dataset.mean, dataset.std)
        return dataset
    trained_on, mean, std = model_inputs(args.load_model)
    if args.dataset and args.dataset != trained_on.key:
        asked = DATASETS[args.dataset].title
        raise ModelFileError(f"{args.load_model}: trained on {trained_on.title}, not {asked}; leave out "
                             f"--dataset {args.dataset} to use it on {trained_on.title}, or load a model "
                             f"trained on {asked}")
    use_input_scaling(mean, std)
    return trained_on


def predict_files(net, paths, out=print, dataset=DATASETS["mnist"]):
    """--predict: classify pictures of digits (of clothes, for a Fashion-MNIST model); one
    line each, errors included. Returns the exit code."""
    prepare = own_digits.fashion_like if dataset.key == "fashion" else own_digits.mnist_like
    names = dataset.classes
    failures = 0
    for path in paths:
        try:
            image = prepare(own_digits.read_image(path))
        except own_digits.ImageError as e:
            out(f"{path}: error: {e}")
            failures += 1
            continue
        probs = predict_proba(net, image[None])[0]
        best, second, third = np.argsort(-probs)[:3]
        out(f"{path}: prediction {names[best]} (p={probs[best]:.2f}), then {names[second]} "
            f"(p={probs[second]:.2f}), {names[third]} (p={probs[third]:.2f})")
    return 1 if failures else 0


def run(args, out=print):
    """The whole job: data, training (or loading), evaluation, log and reports. Returns the exit code."""
    t_start = time.perf_counter()
    if args.gradcheck:
        from tools import gradcheck          # imports this module: only when asked for
        return gradcheck.run_gradient_checks(out)
    if args.download_only:
        dataset = DATASETS[args.dataset or "mnist"]
        return download_only(args.data_dir or dataset.folder, dataset, out)
    net = load_model(args.load_model) if args.load_model else None
    dataset = data_set_of_run(args)
    loaded = (f"{args.load_model}: trained on {dataset.title}, inputs scaled with the mean "
              f"{input_mean:.4f} and std {input_std:.4f} it recorded")
    if args.predict:
        if dataset is not DATASETS["mnist"]:          # an MNIST model's output stays one line per picture
            out(f"Model {loaded}")
        code = predict_files(net, args.predict, out, dataset)
        if args.show_maps is not None or args.why is not None:
            from tools import maps_and_saliency      # only when asked for
            code = max(code, maps_and_saliency.show(args, net, dataset, to_input, write_atomically, out))
        return code
    data_dir = args.data_dir or dataset.folder
    if not args.no_download:
        fetch_missing_files(data_dir, dataset.key)
    data = load_mnist(data_dir, dataset.title)
    _, _, test_x, test_y = data
    if args.diagnose:
        from tools import diagnose               # imports this module: only when asked for
        diagnose.diagnose(args, data, out)
        return 0
    if args.trace is not None and args.trace >= len(test_y):     # checked before any training
        print(f"error: --trace {args.trace}: the test set has {len(test_y)} images, 0 to {len(test_y) - 1}",
              file=sys.stderr)
        return 2
    for flag, i in (("--show-maps", args.show_maps), ("--why", args.why)):
        if i is not None and i >= len(test_y):             # checked before any training
            print(f"error: {flag} {i}: the test set has {len(test_y)} images, 0 to {len(test_y) - 1}",
                  file=sys.stderr)
            return 2
    history = []
    if args.load_model:
        if not args.quiet:
            out(f"Loaded {loaded}")
        config = f"loaded from {args.load_model}: net=\"{net.spec}\""
        evaluation = evaluate(net, test_x, test_y)
    else:
        config = (f"epochs={args.epochs} batch_size={args.batch_size} optimizer={args.optimizer} "
                  f"lr={args.lr} sgd_lr={args.sgd_lr} momentum={args.momentum} schedule={args.schedule} "
                  f"seed={args.seed} limit={args.limit} net=\"{args.net}\""
                  + (f" weight_decay={args.weight_decay}" if args.optimizer == "adamw" else ""))
        net, history, evaluation = train(args, data, out)
    accuracy, pred, probs = evaluation
    report = reports.confusion_report(confusion_matrix(pred, test_y), dataset.classes)
    # the files first: a closed output (| head) or Ctrl-C while printing loses no results
    header = [f"mnist_net  {config}"]
    if dataset is not DATASETS["mnist"]:      # digits are their own names: MNIST's log stays as it was
        header.append(f"data set {dataset.title}; labels: "
                      + ", ".join(f"{i} {name}" for i, name in enumerate(dataset.classes)))
    header += [f"test accuracy {100 * accuracy:.2f}% on {len(test_y)} images"] + report
    text = log_text(pred, test_y, header)
    write_atomically(args.log_file, lambda f: f.write(text.encode()))
    if args.save_model:
        save_model(args.save_model, net, config, dataset.key)
    if args.history:
        reports.write_history(args.history, history, write_atomically)
    out(f"Full {dataset.title} test accuracy: {100 * accuracy:.2f}%")
    out(f"Predictions: {pred[:10]}")
    out(f"Actual:      {test_y[:10]}")
    if not args.quiet:
        for line in report:
            out(line)
    out(f"Wrote {len(pred)} predictions to {args.log_file}")
    if args.save_model:
        out(f"Saved the model to {args.save_model}")
    if args.history:
        out(f"Wrote the training history to {args.history}")
    if args.show_filters:
        reports.show_filters(first_conv_weight(net), out)
    if args.show_mistakes:
        reports.show_mistakes(test_x, test_y, pred, probs, args.show_mistakes, out, dataset.classes)
    looks_inside = args.show_maps is not None or args.why is not None     # their figure goes to --plot
    if args.plot and not looks_inside and reports.plot(args.plot, history, first_conv_weight(net), test_x, test_y,
                                                       pred, probs, write_atomically, out, dataset.classes):
        out(f"Wrote the plot to {args.plot}")
    if looks_inside:
        from tools import maps_and_saliency      # only when asked for
        maps_and_saliency.show(args, net, dataset, to_input, write_atomically, out, (test_x, test_y))
    if args.trace is not None:
        from tools import trace                  # imports this module: only when asked for
        i = args.trace
        trace.trace(net, to_input(test_x[i:i + 1]), test_y[i], i, out, dataset.classes)
    if not args.quiet:
        out(f"Total time {time.perf_counter() - t_start:.1f} s")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (DataError, fetch_data.FetchError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
    except NonFiniteLoss as e:
        print(f"\nerror: {e}; lower the learning rate (--lr, --sgd-lr)", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nInterrupted. Files written so far are complete; none was left half-written.",
              file=sys.stderr)
        return 130
    except BrokenPipeError:           # the output went to a command that stopped reading (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 1
    except OSError as e:              # a folder that became unwritable, a full disk, ...
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
