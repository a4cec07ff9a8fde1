"""A convolutional network for MNIST digits, written from scratch in NumPy.

Every piece a deep-learning framework would hide is here, in the order a
batch meets it: reading the IDX files, an im2col convolution, ReLU, a 2x2
max-pool, two dense layers, softmax cross-entropy, each with its backward
pass right under its forward pass, then Adam and SGD with momentum.
It is not a framework: the layers are functions, the network is one
forward() and one backward() calling them in order, and the training loop
is a for loop.

    python3 mnist_net.py                    # 5 epochs, about 98.7% on the test set
    python3 mnist_net.py --epochs 1 --limit 5000 --optimizer adam
    python3 mnist_net.py --help

The network (shapes for one image, F = 8 filters, H = 128 hidden units):

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
y = x @ w.T + b.  Between the conv and the pool, maps are kept in "pool
order", (F, 4, N, 13, 13): the four positions of each 2x2 pool window as
four blocks (see the convolution section); the pool's output is
(F, N, 13, 13).  Parameters live in a dict keyed like PyTorch's state_dict
("conv.weight", "fc1.bias", ...).  Training runs in float32; the tests run
every backward pass in float64 against finite differences.
"""
import argparse
import itertools
import math
import os
import sys
import time

import numpy as np

import mnist_tools   # what is not about the network (fetching data, reports, your own pictures)

# ---------------------------------------------------------------------------
# Defaults: the recipe of the default run, each with its reason.
# ---------------------------------------------------------------------------
EPOCHS = 5
BATCH_SIZE = 128           # big enough for BLAS to be efficient, small enough for many steps
ADAM_LR = 3e-3             # Adam's step size; with the momentum part below it beats 1e-3
SGD_LR = 0.01              # step size of the SGD-with-momentum part
MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)  # Adam's usual decay rates for the mean and variance estimates
ADAM_EPS = 1e-8
FILTERS = 8
HIDDEN = 128
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


def parse_idx(raw, path, magic, item_shape):
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
        raise DataError(f"{path}: magic number {header[0]}, expected {magic}: not an MNIST "
                        f"{'image' if magic == IMAGE_MAGIC else 'label'} file; replace it with the right one")
    n, shape = int(header[1]), tuple(int(d) for d in header[2:])
    if shape != item_shape:
        raise DataError(f"{path}: items are {shape}, expected {item_shape}: not MNIST; replace it")
    expected = header_len + n * int(np.prod(item_shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path}: {len(raw)} bytes for {n} items, expected {expected}: "
                        f"the file is {what}; replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape((n,) + item_shape)


def load_split(data_dir, split):
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of split 'train' or 'test', checked."""
    paths = {}
    for kind in ("images", "labels"):
        name = IDX_NAMES[f"{split}_{kind}"]
        paths[kind] = find_idx_file(data_dir, name)
        if paths[kind] is None:
            raise DataError(f"{os.path.join(data_dir, name)}: missing (also looked for "
                            f"{', '.join(idx_spellings(name)[1:])}); put the MNIST files "
                            "there or run without --no-download to fetch them")
    images = parse_idx(read_idx_bytes(paths["images"]), paths["images"], IMAGE_MAGIC, (28, 28))
    labels = parse_idx(read_idx_bytes(paths["labels"]), paths["labels"], LABEL_MAGIC, ())
    if len(images) != len(labels):
        raise DataError(f"{paths['images']} has {len(images)} images but {paths['labels']} "
                        f"has {len(labels)} labels: the two files do not belong together")
    if len(labels) and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{paths['labels']}: label {labels[bad]} at index {bad}; "
                        "digit labels are 0-9: replace the file")
    return images, labels


def load_mnist(data_dir):
    """(train_x, train_y, test_x, test_y), images kept as uint8 until a batch needs them."""
    train_x, train_y = load_split(data_dir, "train")
    test_x, test_y = load_split(data_dir, "test")
    return train_x, train_y, test_x, test_y


def to_input(images_u8, out=None):
    """uint8 images (N, 28, 28) -> float32 network input (N, 1, 28, 28).

    x = (pixel / 255 - mean) / std, done as one multiply and one subtract.
    The data stay uint8 (47 MB for the training set, not 188 MB as float32);
    only the batch in use is converted.
    """
    n = len(images_u8)
    if out is None:
        out = np.empty((n, 1, 28, 28), np.float32)
    x = out.reshape(n, 28, 28)
    np.multiply(images_u8, np.float32(1 / (255 * PIXEL_STD)), out=x)
    x -= np.float32(PIXEL_MEAN / PIXEL_STD)
    return out


# ---------------------------------------------------------------------------
# 2. Layers: each forward returns (out, cache); its backward, right under it,
#    takes dout (the gradient of the loss w.r.t. out) and the cache and
#    returns the gradients w.r.t. the forward's inputs.
# ---------------------------------------------------------------------------
def buffer(ws, key, shape, dtype):
    """An uninitialised array; reused from the workspace dict `ws` across steps.

    A fresh multi-megabyte array every step costs thousands of page faults
    (about 3 us each); keeping one per role avoids them.  ws=None allocates.
    """
    if ws is None:
        return np.empty(shape, dtype)
    a = ws.get(key)
    if a is None or a.shape != tuple(shape) or a.dtype != dtype:
        a = ws[key] = np.empty(shape, dtype)
    return a


# --- Convolution, through im2col ------------------------------------------
# out[n, f, i, j] = b[f] + sum over c, ki, kj of w[f, c, ki, kj] * x[n, c, i + ki, j + kj]
# with H_out = (H - KH) // stride + 1 = 26 for H = 28, KH = 3, stride 1, no padding.
#
# im2col copies every 3x3 patch into one column of a matrix `cols` (C*KH*KW rows),
# so the whole convolution becomes one matrix product: w (F, C*KH*KW) @ cols.
#
# The columns are ordered for the 2x2 pool that follows: output pixel (2p + di, 2q + dj)
# sits in block k = 2*di + dj (its place inside its pool window), and within the block at
# (n, p, q).  So the conv output has the layout (F, 4, N, H_out/2, W_out/2): four
# contiguous "phase" maps, and the pool is an elementwise max of four blocks.
def im2col(x, ws=None, KH=3, KW=3):
    """x (N, C, H, W) -> cols (C*KH*KW, 4, N, Hp, Wp) with Hp = (H - KH + 1) // 2.

    cols[c*KH*KW + ki*KW + kj, 2*di + dj, n, p, q] = x[n, c, 2p + di + ki, 2q + dj + kj]
    """
    N, C, H, W = x.shape
    Hp, Wp = (H - KH + 1) // 2, (W - KW + 1) // 2
    cols = buffer(ws, "im2col", (C, KH, KW, 4, N, Hp, Wp), x.dtype)
    sub = subsampled(x, KW, Wp, ws)                    # (C, 2, KW + 1, N, H // 2, Wp)
    for c, ki, di, dj in itertools.product(range(C), range(KH), range(2), range(2)):
        r = ki + di
        # x[:, c, r::2, s::2] cut to (Hp, Wp) is sub[c, r % 2, s] moved down by r // 2 rows;
        # the KW columns kj = 0, 1, 2 (s = dj + kj) are three neighbouring blocks of sub,
        # so one copy fills three rows of cols (a third of the calls)
        cols[c, ki, :, 2 * di + dj] = sub[c, r % 2, dj:dj + KW, :, r // 2:r // 2 + Hp]
    return cols.reshape(C * KH * KW, 4, N, Hp, Wp)


def subsampled(x, KW, Wp, ws=None):
    """x (N, C, H, W), H even -> sub (C, 2, KW + 1, N, H // 2, Wp), a speed aid for im2col:
    sub[c, a, s] = x[:, c, a::2, s::2] cut to Wp columns (every other row from row a,
    every other column from column s).

    im2col could copy every other pixel straight from x, but such a copy moves 13
    floats at a time.  Taken from these arrays, each of its blocks is Hp whole rows:
    169 contiguous floats per image, 2.5x faster.
    """
    N, C, H, W = x.shape
    sub = buffer(ws, "im2col.sub", (C, 2, KW + 1, N, H // 2, Wp), x.dtype)
    for c, a, s in itertools.product(range(C), range(2), range(KW + 1)):
        sub[c, a, s] = x[:, c, a::2, s::2][:, :, :Wp]
    return sub


def col2im(dcols, x_shape, KH=3, KW=3):
    """The adjoint of im2col: add every column back onto the pixels it was copied from."""
    N, C, H, W = x_shape
    _, _, _, Hp, Wp = dcols.shape
    dx = np.zeros(x_shape, dcols.dtype)
    for c, ki, kj, di, dj in itertools.product(range(C), range(KH), range(KW), range(2), range(2)):
        r, s = ki + di, kj + dj
        dx[:, c, r:r + 2 * Hp:2, s:s + 2 * Wp:2] += dcols[c * KH * KW + ki * KW + kj, 2 * di + dj]
    return dx


def column_chunks(a):
    """(R, 4, N, Hp, Wp) -> (chunks, R, width) view: the (R, P) matrix, P = 4*N*Hp*Wp,
    cut into equal chunks of columns, each up to 32 whole maps (5,408 columns).

    The conv's matrix products run chunk by chunk (dw then sums the chunks' products):
    the same numbers, faster.  BLAS is slow on one product with a tiny (F, K) side and
    tens of thousands of columns (5x slower for dw), and one product per map pays a
    call for every 169 columns.
    """
    R, _, N, Hp, Wp = a.shape
    maps = math.gcd(4 * N, 32)                    # 32 maps per chunk, fewer if 4N is not a multiple
    return a.reshape(R, 4 * N // maps, maps * Hp * Wp).transpose(1, 0, 2)


def conv_forward(x, w, b, ws=None):
    """x (N, C, H, W), w (F, C, KH, KW), b (F,) or None -> out (F, 4, N, Hp, Wp) in pool order.

    The output is even-sized (26x26 here), as the 2x2 pool after it needs.
    b=None leaves the bias out, for a caller that adds it later (see forward()).
    """
    F, C, KH, KW = w.shape
    cols = im2col(x, ws, KH, KW)                      # (K, 4, N, Hp, Wp), K = C*KH*KW
    K, _, N, Hp, Wp = cols.shape
    out = buffer(ws, "conv.out", (F, 4, N, Hp, Wp), x.dtype)
    # out = w (F, K) @ cols (K, 4*N*Hp*Wp): every output pixel of every filter (chunk by chunk)
    np.matmul(w.reshape(F, K), column_chunks(cols), out=column_chunks(out))
    if b is not None:
        out += b.reshape(F, 1, 1, 1, 1)
    return out, (x.shape, w, b is not None, cols)


def conv_backward(dout, cache, need_dx=True):
    """dout (F, 4, N, Hp, Wp) -> dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,) or None.

    out = w @ cols + b, so dw = dout @ cols.T, db = dout summed over every
    position, dcols = w.T @ dout, and dx adds dcols back through col2im.
    db is None when the forward had no bias.  The first layer never needs dx in
    training (nothing learns below it), so the caller may skip it with need_dx=False.
    """
    x_shape, w, has_bias, cols = cache
    F, K = w.shape[0], cols.shape[0]
    # dw = dout (F, P) @ cols.T (P, K), summed over the chunks: (chunks, F, width) @ (chunks, width, K)
    dw = np.matmul(column_chunks(dout), column_chunks(cols).transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    db = dout.reshape(F, -1).sum(axis=1) if has_bias else None
    dx = None
    if need_dx:
        dcols = np.empty_like(cols)
        np.matmul(w.reshape(F, K).T, column_chunks(dout), out=column_chunks(dcols))   # (K, F) @ (F, P)
        dx = col2im(dcols, x_shape, w.shape[2], w.shape[3])
    return dx, dw, db


# --- ReLU -----------------------------------------------------------------
def relu_forward(x, out=None):
    """out = max(x, 0), elementwise.  The cache is the output itself."""
    # against a row of zeros, not the scalar 0: NumPy's max with a scalar is 2x slower
    out = np.maximum(x, np.zeros(x.shape[-1], x.dtype), out=out)
    return out, out


def relu_backward(dout, cache, out=None):
    """dx = dout where the input was positive, else 0 (the slope of max(x, 0))."""
    y = cache
    return np.multiply(dout, y > 0, out=out)


# --- 2x2 max-pool -----------------------------------------------------------
# out[n, f, p, q] = max over di, dj in {0, 1} of a[n, f, 2p + di, 2q + dj]
# Only the winning input changed the output, so the backward hands each window's
# gradient to exactly one position.  When several tie (whole windows of a blank
# MNIST border are equal), it goes to the first in reading order (top-left,
# top-right, bottom-left, bottom-right).  Giving it to every tied position would
# multiply it, and no longer be the gradient of max.
def maxpool_forward(a, ws=None):
    """a (F, 4, N, Hp, Wp) in pool order -> out (F, N, Hp, Wp), cache: who won.

    In pool order a window's four members are the blocks a[:, 0..3] (top-left,
    top-right, bottom-left, bottom-right).  The max is a small tournament:
    top-left vs top-right, bottom-left vs bottom-right, then the two winners.
    Each match is won by the left or upper side unless the other is strictly
    greater, so a tie goes to the first position in reading order.
    """
    shape = a[:, 0].shape                                          # (F, N, Hp, Wp)
    top = np.maximum(a[:, 0], a[:, 1], out=buffer(ws, "pool.top", shape, a.dtype))
    bottom = np.maximum(a[:, 2], a[:, 3], out=buffer(ws, "pool.bottom", shape, a.dtype))
    right_won_top = np.greater(a[:, 1], a[:, 0], out=buffer(ws, "pool.rt", shape, bool))
    right_won_bottom = np.greater(a[:, 3], a[:, 2], out=buffer(ws, "pool.rb", shape, bool))
    bottom_won = np.greater(bottom, top, out=buffer(ws, "pool.b", shape, bool))
    out = np.maximum(top, bottom, out=top)
    return out, (right_won_top, right_won_bottom, bottom_won)


def maxpool_backward(dout, cache, ws=None, out=None):
    """dout (F, N, Hp, Wp) -> da (F, 4, N, Hp, Wp): each window's gradient to its winner only.

    The gradient goes back down the tournament: to the winning pair, then to
    the winner within the pair; every other position gets 0.  out: an array to
    write da into (see backward()), else a buffer of its own.
    """
    right_won_top, right_won_bottom, bottom_won = cache
    F, N, Hp, Wp = dout.shape
    da = out if out is not None else buffer(ws, "pool.da", (F, 4, N, Hp, Wp), dout.dtype)
    to_bottom = np.multiply(dout, bottom_won, out=buffer(ws, "pool.d", dout.shape, dout.dtype))
    to_top = np.subtract(dout, to_bottom, out=da[:, 0])            # dout where the top pair won
    np.multiply(to_top, right_won_top, out=da[:, 1])
    da[:, 0] -= da[:, 1]                                           # what top-right did not take
    np.multiply(to_bottom, right_won_bottom, out=da[:, 3])
    np.subtract(to_bottom, da[:, 3], out=da[:, 2])
    return da


# --- Dense (fully connected) ------------------------------------------------
def dense_forward(x, w, b, out=None):
    """x (N, D), w (M, D), b (M,) -> out = x @ w.T + b, (N, M)."""
    out = np.matmul(x, w.T, out=out)
    out += b
    return out, (x, w)


def dense_backward(dout, cache, need_dx=True):
    """dout (N, M) -> dx (N, D), dw (M, D), db (M,).

    dx = dout @ w, dw = dout.T @ x, db = dout summed over the batch.
    """
    x, w = cache
    dx = dout @ w if need_dx else None
    dw = dout.T @ x
    db = dout.sum(axis=0)
    return dx, dw, db


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
# 3. The network: parameters, forward, backward.
# ---------------------------------------------------------------------------
def param_shapes(filters=FILTERS, hidden=HIDDEN):
    """Name -> shape of every parameter, in PyTorch's layouts."""
    flat_size = filters * 13 * 13       # 26x26 conv map pooled to 13x13, F channels
    return {
        "conv.weight": (filters, 1, 3, 3),
        "conv.bias": (filters,),
        "fc1.weight": (hidden, flat_size),
        "fc1.bias": (hidden,),
        "fc2.weight": (10, hidden),
        "fc2.bias": (10,),
    }


def flat_views(flat, shapes):
    """Split one flat vector into named arrays that share its memory."""
    views, start = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = flat[start:start + size].reshape(shape)
        start += size
    return views


def init_params(rng, filters=FILTERS, hidden=HIDDEN, dtype=np.float32):
    """PyTorch's default initialisation: w and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    fan_in is the number of inputs one output unit sees: 1*3*3 for the conv,
    F*13*13 for fc1, H for fc2.  Returns (flat vector, dict of views into it):
    the optimizers update all 174,554 parameters (for F=8, H=128) as one array.
    """
    shapes = param_shapes(filters, hidden)
    flat = np.empty(sum(math.prod(s) for s in shapes.values()), dtype)
    params = flat_views(flat, shapes)
    fan_in = {"conv": 9, "fc1": filters * 13 * 13, "fc2": hidden}
    for name, p in params.items():
        bound = 1 / math.sqrt(fan_in[name.split(".")[0]])
        p[...] = rng.uniform(-bound, bound, p.shape)
    return flat, params


def forward(params, x, ws=None):
    """x (N, 1, 28, 28) -> logits (N, 10), and the caches backward() needs.

    The caches also carry the conv output z0, which backward() does not read: it
    reuses z0's memory for the gradient dz0 (so after backward() it holds dz0).
    """
    N = len(x)
    F = params["conv.bias"].shape[0]
    # conv + bias -> ReLU -> pool is computed as conv -> pool -> + bias -> ReLU.  The
    # numbers are the same: max(z + b) = max(z) + b when b is shared by the window, and
    # max(relu(z)) = relu(max(z)).  The bias and ReLU then touch 4x fewer values.
    z0, conv_cache = conv_forward(x, params["conv.weight"], None, ws)   # (F, 4, N, 13, 13)
    m0, pool_cache = maxpool_forward(z0, ws)                              # (F, N, 13, 13)
    _, _, Hp, Wp = m0.shape
    # Write the rest straight into the flattened layout fc1 reads: each image in
    # (channel, row, column) order, as PyTorch's Flatten does.
    h0_images = buffer(ws, "flat", (N, F, Hp, Wp), x.dtype)
    h0_by_channel = h0_images.transpose(1, 0, 2, 3)                       # (F, N, 13, 13) view
    np.add(m0, params["conv.bias"].reshape(F, 1, 1, 1), out=h0_by_channel)
    h0 = h0_images.reshape(N, F * Hp * Wp)                                # (N, 1352)
    h0, relu0_cache = relu_forward(h0, out=h0)                            # in place
    z1, fc1_cache = dense_forward(h0, params["fc1.weight"], params["fc1.bias"],
                                  out=buffer(ws, "fc1.out", (N, params["fc1.bias"].shape[0]), x.dtype))
    h1, relu1_cache = relu_forward(z1, out=z1)                            # (N, H), in place
    logits, fc2_cache = dense_forward(h1, params["fc2.weight"], params["fc2.bias"])  # (N, 10)
    return logits, (conv_cache, z0, pool_cache, relu0_cache, fc1_cache, relu1_cache, fc2_cache)


def backward(dlogits, caches, ws=None, need_dx=False):
    """dlogits (N, 10) -> dict of gradients keyed like the parameters (and "x" if need_dx)."""
    conv_cache, z0, pool_cache, relu0_cache, fc1_cache, relu1_cache, fc2_cache = caches
    grads = {}
    dh1, grads["fc2.weight"], grads["fc2.bias"] = dense_backward(dlogits, fc2_cache)   # (N, H)
    dz1 = relu_backward(dh1, relu1_cache, out=dh1)
    dh0, grads["fc1.weight"], grads["fc1.bias"] = dense_backward(dz1, fc1_cache)       # (N, F*169)
    da0 = relu_backward(dh0, relu0_cache, out=dh0)       # gradient at m0 + bias, the ReLU's input (N, F*169)
    F, N, Hp, Wp = pool_cache[0].shape                                                 # the pool's output shape
    dm0 = da0.reshape(N, F, Hp, Wp).transpose(1, 0, 2, 3)                              # (F, N, 13, 13) view
    # The pool's gradient is written over the conv output z0, unused since the forward:
    # one 2.8 MB array fewer passing through the CPU caches (about 6% faster per step).
    dz0 = maxpool_backward(dm0, pool_cache, ws, out=z0)                                 # (F, 4, N, 13, 13)
    # The conv bias was added after the pool, to every value of channel f: its gradient
    # is dm0 summed over the batch and the map.  The sum over the batch is a product with
    # ones, which BLAS does 4x faster than sum(axis=...).
    grads["conv.bias"] = (np.ones(N, da0.dtype) @ da0).reshape(F, Hp * Wp).sum(axis=1)
    dx, grads["conv.weight"], _ = conv_backward(dz0, conv_cache, need_dx)
    if need_dx:
        grads["x"] = dx
    return grads


def loss_and_grads(params, x, y, ws=None):
    """One training step's maths: mean loss, gradients, and the batch's logits."""
    logits, caches = forward(params, x, ws)
    loss, dlogits = softmax_cross_entropy(logits, y)
    return loss, backward(dlogits, caches, ws), logits


def predict_proba(params, images_u8, batch=EVAL_BATCH, ws=None):
    """Softmax probabilities (N, 10) for uint8 images, a batch at a time."""
    probs = np.empty((len(images_u8), 10), np.float32)
    ws = {} if ws is None else ws
    for i in range(0, len(images_u8), batch):
        logits, _ = forward(params, to_input(images_u8[i:i + batch]), ws)
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
        # Every line below is one pass over the 174,554 values, written into kept arrays
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


def make_optimizer(name, size, adam_lr=ADAM_LR, sgd_lr=SGD_LR, momentum=MOMENTUM):
    if name == "adam":
        return Adam(size, adam_lr)
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


def train_epoch(params, flat, opt, train_x, train_y, batch_size, rng, step0, total_steps,
                schedule="cosine", ws=None, progress=None):
    """One pass over the training set in a fresh random order.

    Returns (mean loss over the epoch, training accuracy, steps taken).
    Every example is used exactly once: the order is a permutation, not sampling.
    """
    n = len(train_x)
    order = rng.permutation(n)                # shuffles indices; the caller's data stay as they are
    grad = np.empty_like(flat)
    x_buf = np.empty((batch_size, 1, 28, 28), flat.dtype)
    loss_sum, correct, step = 0.0, 0, step0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = to_input(train_x[idx], out=x_buf[:len(idx)])
        y = train_y[idx]
        loss, grads, logits = loss_and_grads(params, x, y, ws)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at step {step + 1}")
        # all gradients into one flat vector, in the parameters' order, for the optimizer
        np.concatenate([grads[name].ravel() for name in params], out=grad)
        scale = cosine_scale(step, total_steps) if schedule == "cosine" else 1.0
        flat += opt.update(grad, scale)
        step += 1
        loss_sum += loss * len(idx)
        correct += int((logits.argmax(axis=1) == y).sum())
        if progress:
            progress(start + len(idx), n, loss_sum / (start + len(idx)))
    return loss_sum / n, correct / n, step - step0


def evaluate(params, images, labels, ws=None):
    """(accuracy, predictions, probabilities) on a labelled set."""
    probs = predict_proba(params, images, ws=ws)
    pred = probs.argmax(axis=1)
    return float((pred == labels).mean()), pred, probs


def confusion_matrix(pred, labels):
    """counts[true, predicted]."""
    counts = np.zeros((10, 10), np.int64)
    np.add.at(counts, (labels.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


def train(args, data, out=print):
    """Build the network, train it as `args` says.  Returns the parameters, a list
    with one dict per epoch (loss, accuracies, seconds) and the last epoch's test
    evaluation (accuracy, predictions, probabilities), so nobody runs it twice."""
    train_x, train_y, test_x, test_y = data
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    rng = np.random.default_rng(args.seed)
    flat, params = init_params(rng, args.filters, args.hidden)
    opt = make_optimizer(args.optimizer, flat.size, args.lr, args.sgd_lr, args.momentum)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if not args.quiet:
        out(f"Training on {len(train_x)} images ({steps_per_epoch} steps of {args.batch_size} per epoch), "
            f"testing on {len(test_x)}")
        out(f"{flat.size:,} parameters, optimizer {args.optimizer}, {args.schedule} learning rate")
    ws, eval_ws, step, history = {}, {}, 0, []     # buffers kept across steps and epochs
    for epoch in range(1, args.epochs + 1):
        progress = None if args.quiet else ProgressLine(f"epoch {epoch}/{args.epochs}")
        t0 = time.perf_counter()
        # a blow-up is reported in plain words by train_epoch's finite-loss check,
        # not by NumPy's overflow warnings
        with np.errstate(over="ignore", invalid="ignore"):
            loss, train_acc, taken = train_epoch(params, flat, opt, train_x, train_y, args.batch_size,
                                                 rng, step, total_steps, args.schedule, ws, progress)
        step += taken
        evaluation = evaluate(params, test_x, test_y, eval_ws)
        test_acc = evaluation[0]
        seconds = time.perf_counter() - t0
        if progress:
            progress.clear()
        history.append({"epoch": epoch, "loss": loss, "train_accuracy": train_acc,
                        "test_accuracy": test_acc, "seconds": seconds})
        if not args.quiet:
            out(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  train acc {100 * train_acc:.2f}%  "
                f"test acc {100 * test_acc:.2f}%  {seconds:.1f} s")
    return params, history, evaluation


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


STATE_NAMES = tuple(param_shapes())


def save_model(path, params, config):
    """An .npz with PyTorch's state_dict names and layouts, the input scaling and the config."""
    arrays = {name: params[name] for name in STATE_NAMES}
    arrays["input_mean"] = np.float32(PIXEL_MEAN)
    arrays["input_std"] = np.float32(PIXEL_STD)
    arrays["config"] = np.array(config)
    write_atomically(path, lambda f: np.savez(f, **arrays))


def load_model(path):
    """Parameters from a file save_model wrote; raises ModelFileError saying what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as e:
        raise ModelFileError(f"{path}: not a readable .npz model file ({type(e).__name__}: {e})") from None
    missing = [n for n in STATE_NAMES + ("input_mean", "input_std") if n not in stored]
    if missing:
        raise ModelFileError(f"{path}: not an mnist_net model, missing {', '.join(missing)}")
    for name in STATE_NAMES + ("input_mean", "input_std"):
        a = stored[name]
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
            raise ModelFileError(f"{path}: {name} is not an array of finite floats")
        scalar = name in ("input_mean", "input_std")
        if (a.ndim == 0) != scalar:
            raise ModelFileError(f"{path}: {name} has shape {a.shape}, not what save_model writes")
    if not (np.isclose(stored["input_mean"], PIXEL_MEAN) and np.isclose(stored["input_std"], PIXEL_STD)):
        raise ModelFileError(f"{path}: trained on inputs scaled with mean {stored['input_mean']} and "
                             f"std {stored['input_std']}, this program uses {PIXEL_MEAN} and {PIXEL_STD}")
    filters, hidden = stored["conv.bias"].shape[0], stored["fc1.bias"].shape[0]
    shapes = param_shapes(filters, hidden)
    flat = np.empty(sum(math.prod(s) for s in shapes.values()), np.float32)
    params = flat_views(flat, shapes)
    for name, shape in shapes.items():
        if stored[name].shape != shape:
            raise ModelFileError(f"{path}: {name} has shape {stored[name].shape}, expected {shape} "
                                 f"for {filters} filters and {hidden} hidden units")
        params[name][...] = stored[name]
    return params


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
        description="Train a small CNN on MNIST in NumPy, print the test accuracy and "
                    "write every test prediction to a log.")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS,
                   help="passes over the training set (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                   help="images per training step (default: %(default)s)")
    p.add_argument("--optimizer", choices=("dual", "adam", "momentum"), default="dual",
                   help="dual adds Adam's and momentum's updates each step, as the original did "
                        "(default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=ADAM_LR,
                   help="Adam's learning rate, used by adam and dual (default: %(default)s)")
    p.add_argument("--sgd-lr", type=positive_float, default=SGD_LR,
                   help="learning rate of SGD with momentum, used by momentum and dual "
                        "(default: %(default)s)")
    p.add_argument("--momentum", type=momentum_value, default=MOMENTUM,
                   help="momentum of the SGD part (default: %(default)s)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine decays both learning rates to 0 over all steps (default: %(default)s)")
    p.add_argument("--seed", type=checked(int, lambda v: v >= 0, "a whole number, 0 or more"), default=SEED,
                   help="seed for the initial weights and the shuffling (default: %(default)s)")
    p.add_argument("--filters", type=positive_int, default=FILTERS,
                   help="conv filters (default: %(default)s)")
    p.add_argument("--hidden", type=positive_int, default=HIDDEN,
                   help="units of the hidden dense layer (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="train on the first N training images only (default: all)")
    p.add_argument("--data-dir", default=DATA_DIR,
                   help="folder with the four MNIST IDX files (default: mnist_data/ next to this script)")
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
                       help="draw curves, filters and mistakes to a PNG; needs matplotlib (default: none)")
    looks.add_argument("--predict", metavar="IMAGE", nargs="+", default=None,
                       help="with --load-model: classify your own digit pictures (PGM, .npy; PNG and "
                            "JPEG with Pillow) (default: none)")
    args = p.parse_args(argv)
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
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: is a file, not a folder")
    if args.save_model is not None and not args.save_model.endswith(".npz"):
        p.error(f"--save-model {args.save_model}: the file name must end in .npz")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        p.error(f"--load-model {args.load_model}: no such file")
    if args.predict and not args.load_model:
        p.error("--predict needs --load-model PATH.npz (train and save one first with --save-model)")
    if args.history and args.load_model:
        p.error("--history records training: it does not go with --load-model")
    return args


def fetch_missing_files(data_dir):
    """Fetch whichever of the four files data_dir lacks (see mnist_tools.py)."""
    missing = [name for name in IDX_NAMES.values() if find_idx_file(data_dir, name) is None]
    if missing:
        mnist_tools.fetch_missing(data_dir, missing)


def download_only(data_dir, out=print):
    """--download-only: fetch what is missing, then list the four files with their SHA-256."""
    fetch_missing_files(data_dir)
    paths = {name: find_idx_file(data_dir, name) for name in IDX_NAMES.values()}
    lines = mnist_tools.describe_files(paths, read_idx_bytes)
    for line in lines:
        out(line)
    return 0 if all(line.endswith("canonical MNIST") for line in lines) else 1


def predict_files(params, paths, out=print):
    """--predict: classify pictures of digits; one line each, errors included. Returns the exit code."""
    failures = 0
    for path in paths:
        try:
            image = mnist_tools.mnist_like(mnist_tools.read_image(path))
        except mnist_tools.ImageError as e:
            out(f"{path}: error: {e}")
            failures += 1
            continue
        probs = predict_proba(params, image[None])[0]
        best, second, third = np.argsort(-probs)[:3]
        out(f"{path}: prediction {best} (p={probs[best]:.2f}), then {second} (p={probs[second]:.2f}), "
            f"{third} (p={probs[third]:.2f})")
    return 1 if failures else 0


def run(args, out=print):
    """The whole job: data, training (or loading), evaluation, log and reports. Returns the exit code."""
    t_start = time.perf_counter()
    if args.gradcheck:
        return mnist_tools.run_gradient_checks(sys.modules[__name__], out)
    if args.download_only:
        return download_only(args.data_dir, out)
    if args.predict:
        return predict_files(load_model(args.load_model), args.predict, out)
    if not args.no_download:
        fetch_missing_files(args.data_dir)
    data = load_mnist(args.data_dir)
    _, _, test_x, test_y = data
    history = []
    if args.load_model:
        params = load_model(args.load_model)
        config = f"loaded from {args.load_model}"
        evaluation = evaluate(params, test_x, test_y)
    else:
        config = (f"epochs={args.epochs} batch_size={args.batch_size} optimizer={args.optimizer} "
                  f"lr={args.lr} sgd_lr={args.sgd_lr} momentum={args.momentum} schedule={args.schedule} "
                  f"seed={args.seed} filters={args.filters} hidden={args.hidden} limit={args.limit}")
        params, history, evaluation = train(args, data, out)
    accuracy, pred, probs = evaluation
    report = mnist_tools.confusion_report(confusion_matrix(pred, test_y))
    # the files first: a closed output (| head) or Ctrl-C while printing loses no results
    header = [f"mnist_net  {config}", f"test accuracy {100 * accuracy:.2f}% on {len(test_y)} images"] + report
    text = log_text(pred, test_y, header)
    write_atomically(args.log_file, lambda f: f.write(text.encode()))
    if args.save_model:
        save_model(args.save_model, params, config)
    if args.history:
        mnist_tools.write_history(args.history, history, write_atomically)
    out(f"Full MNIST test accuracy: {100 * accuracy:.2f}%")
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
        mnist_tools.show_filters(params["conv.weight"], out)
    if args.show_mistakes:
        mnist_tools.show_mistakes(test_x, test_y, pred, probs, args.show_mistakes, out)
    if args.plot and mnist_tools.plot(args.plot, history, params["conv.weight"], test_x, test_y, pred, probs,
                                      write_atomically, out):
        out(f"Wrote the plot to {args.plot}")
    if not args.quiet:
        out(f"Total time {time.perf_counter() - t_start:.1f} s")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (DataError, mnist_tools.FetchError, ModelFileError) as e:
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
