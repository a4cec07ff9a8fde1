"""A convolutional network for MNIST digits, written from scratch in NumPy.

This file is the chapter: read it top to bottom.  Every piece a framework would
hide is here, in the order a batch meets it: reading the IDX files, the layers (an
im2col convolution, ReLU, a 2x2 max-pool, batch norm, dropout, dense layers, softmax
cross-entropy), each backward pass right under its forward pass, the network as a
list of layers, Adam, AdamW and SGD with momentum, and the training loop.

    python3 mnist_net.py                    # the original network, 5 epochs, about 98.7%
    python3 mnist_net.py --net deep         # two conv blocks with batch norm, about 99.3%
    python3 mnist_net.py --net "conv8 relu conv16 relu pool dropout0.25 fc64 relu fc10"
    python3 mnist_net.py --plain            # this file's own layers, not fast_layers.py's

It runs alone beside a folder mnist_data/ with the four MNIST files.  The rest of the
project is used when present: fast_layers.py (the same layers, faster, proven equal by
the tests; the default, on two cores where two_processes.py finds that safe), tools/
(fetching the data, model files, looking inside).

The original network (--net seed; shapes for one image, F = 8 filters, 128 hidden units):

    image (1, 28, 28)
    -> conv 3x3, F filters, + bias  (F, 26, 26)   26 = 28 - 3 + 1
    -> ReLU                         (F, 26, 26)
    -> 2x2 max-pool                 (F, 13, 13)
    -> flatten                      (F*13*13,)    1352 for F = 8
    -> dense + bias, ReLU           (128,)
    -> dense + bias                 (10,)         one score (logit) per digit
    -> softmax cross-entropy against the true digit

Conventions: a batch of images is x: (N, C, H, W); conv weights are (F, C, KH, KW); a
dense layer's weight is (out, in), as in PyTorch: y = x @ w.T + b.  Parameters are keyed
like PyTorch's state_dict ("conv1.weight", "bn1.running_var", ...).  Training runs in
float32; the tests check every backward pass in float64 against finite differences and
every layer against a loop version (tests/reference.py).
"""
import argparse
import collections
import gzip
import math
import os
import re
import shutil
import sys
import time
import zlib

import numpy as np

# ---------------------------------------------------------------------------
# Defaults of the default run, most with their reason (--optimizer dual: Adam's step plus
# momentum's, and a cosine schedule of the step size, the learning rate: both in section 4).
# ---------------------------------------------------------------------------
EPOCHS = 5
BATCH_SIZE = 128           # big enough for fast matrix products, small enough for many steps
DEEP_BATCH_SIZE = 64       # --net deep's recipe: twice the steps in 5 epochs, 99.31% median over
                           # seeds 0-2 where 128 gave 99.23% (see docs/results.md)
ADAM_LR = 3e-3             # Adam's step size; with the momentum part below it beats 1e-3
SGD_LR = 0.01              # step size of the SGD-with-momentum part
MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)  # Adam's usual decay rates for its running means of g and of g*g
ADAM_EPS = 1e-8
FILTERS, HIDDEN = 8, 128   # the seed network's conv filters and hidden dense units
WEIGHT_DECAY = 0.01        # AdamW's decay (PyTorch's default); only --optimizer adamw uses it
SEED = 0
PIXEL_MEAN = 0.1307        # mean and std of MNIST training pixels after /255: inputs scaled
PIXEL_STD = 0.3081         # to mean 0 and std 1 reach about 0.2 points more test accuracy
EVAL_BATCH = 128           # test images per forward pass: 256 falls out of the CPU caches (15% slower)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_data")
LOG_FILE = "mnist_test_log.txt"


# ---------------------------------------------------------------------------
# 1. Data: the four IDX files, read through python-mnist, then checked.
# ---------------------------------------------------------------------------
# An IDX file is a big-endian header then raw bytes:
#   images: magic 2051, count N, rows 28, cols 28, then N*28*28 pixels (0-255)
#   labels: magic 2049, count N, then N labels (0-9)
IDX_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


# MNIST and Fashion-MNIST share the IDX format, the four file names, 60,000 + 10,000 28x28
# grey images and 10 classes: one loader reads both.  mean, std: of its training pixels after /255
DataSet = collections.namedtuple("DataSet", "key title folder classes mean std")
DATASETS = {
    "mnist": DataSet("mnist", "MNIST", DATA_DIR, tuple("0123456789"), PIXEL_MEAN, PIXEL_STD),
    "fashion": DataSet("fashion", "Fashion-MNIST", os.path.join(DATA_DIR, "fashion"),
                       ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), 0.2860, 0.3530),
}


class DataError(Exception):
    """A data file is missing or damaged; the message says which and what to do."""


def read_idx_bytes(path):
    """The whole (decompressed) content of an IDX file, opened by python-mnist.

    python-mnist's opener reads a raw or a .gz file (it appends ".gz" itself: hence path[:-3]).
    Its load() would then turn 47 million pixels into Python ints (750 MB, 7 s), so we take
    the bytes and let NumPy view them as uint8 in one step instead (section 6 checks them).
    """
    try:
        from mnist import MNIST
    except ImportError:
        raise DataError("the python-mnist package is missing: pip install -r requirements.txt") from None
    loader = MNIST(os.path.dirname(path), gz=path.endswith(".gz"))
    with loader.opener(path[:-3] if loader.gz else path, "rb") as f:
        return f.read()


def load_split(data_dir, split, title="MNIST"):
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of split 'train' or 'test'.  A missing,
    wrong or truncated file stops with a message saying which and what to do (section 6)."""
    images = read_idx(data_dir, IDX_NAMES[f"{split}_images"], IMAGE_MAGIC, (28, 28), title)
    labels = read_idx(data_dir, IDX_NAMES[f"{split}_labels"], LABEL_MAGIC, (), title)
    check_labels(images, labels, data_dir, split, title)
    return images, labels


def load_mnist(data_dir, title="MNIST"):
    """(train_x, train_y, test_x, test_y), images kept as uint8 until a batch needs them
    (47 MB for the training set, not 188 MB as float32)."""
    return load_split(data_dir, "train", title) + load_split(data_dir, "test", title)


def to_input(images_u8, mean=PIXEL_MEAN, std=PIXEL_STD):
    """uint8 images (N, 28, 28) -> float32 network input (N, 1, 28, 28): (pixel / 255 - mean) / std,
    with the mean and std of the data set's training pixels (a network keeps the ones it
    was trained with: net.mean, net.std, section 3), as one multiply and one subtract."""
    x = images_u8.astype(np.float32) * np.float32(1 / (255 * std)) - np.float32(mean / std)
    return x[:, None]                                               # (N, 1, 28, 28): one channel


# ---------------------------------------------------------------------------
# 2. Layers.  Each layer is a small object: forward(x, train) returns its output and
#    keeps what its backward needs; backward(dout, need_dx), right under it, takes dout
#    (the gradient of the loss w.r.t. its output), writes its parameters' gradients in
#    place, `[...] =`, into self.grads (self.grads and self.params are views into the
#    network's flat vectors, section 3) and returns dx, the gradient w.r.t. its input (a layer
#    with parameters returns None instead when need_dx is False: nothing below it learns).
# ---------------------------------------------------------------------------
class Layer:
    """What every layer has; layers without parameters keep the dicts empty."""
    shapes = {}            # parameter name -> shape, PyTorch's layouts
    fan_in = 1             # inputs one output unit sees (for the initial weights)

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}      # buffers: kept state, not learned


# --- Convolution, through im2col ------------------------------------------
# out[n, f, i, j] = b[f] + sum over c, ki, kj of w[f, c, ki, kj] * xpad[n, c, i + ki, j + kj]
# where xpad is x with `pad` rows and columns of zeros around each map (one channel's
# H x W grid), and H_out = H + 2*pad - K + 1 (stride 1: 26 = 28 - 3 + 1), W_out likewise.
#
# im2col copies every KxK patch of xpad (kernels here are square) into one column of a
# matrix `cols` (C*K*K rows, one column per output pixel), so the whole convolution is
# one matrix product: out = w (F, C*K*K) @ cols + b.
def im2col(xpad, K):
    """xpad (N, C, Hp, Wp) -> cols (C*K*K, N*Ho*Wo), Ho = Hp - K + 1, for a KxK kernel:
    cols[c*K*K + ki*K + kj, n*Ho*Wo + i*Wo + j] = xpad[n, c, i + ki, j + kj].

    One copy per kernel position (9 for 3x3), each moving every channel and image at
    once.  Rows by kernel position and columns by output pixel, not the other way
    round: the copies then write long runs, 5x faster on MNIST.
    """
    N, C, Hp, Wp = xpad.shape
    Ho, Wo = Hp - K + 1, Wp - K + 1
    by_channel = xpad.transpose(1, 0, 2, 3)                         # (C, N, Hp, Wp), a view
    cols = np.empty((C, K, K, N, Ho, Wo), xpad.dtype)
    for ki in range(K):
        for kj in range(K):
            cols[:, ki, kj] = by_channel[:, :, ki:ki + Ho, kj:kj + Wo]
    return cols.reshape(C * K * K, N * Ho * Wo)


def col2im(dcols, xpad_shape, K):
    """Backward of im2col, dcols (C*K*K, N*Ho*Wo) -> dxpad (N, C, Hp, Wp): every column entry is
    added back onto the pixel it was copied from (a pixel under several patches collects several)."""
    N, C, Hp, Wp = xpad_shape
    Ho, Wo = Hp - K + 1, Wp - K + 1
    d = dcols.reshape(C, K, K, N, Ho, Wo)
    dx = np.zeros((C, N, Hp, Wp), dcols.dtype)
    for ki in range(K):
        for kj in range(K):
            dx[:, :, ki:ki + Ho, kj:kj + Wo] += d[:, ki, kj]
    return dx.transpose(1, 0, 2, 3)                                 # (N, C, Hp, Wp)


class Conv(Layer):
    kind = "conv"

    def __init__(self, in_channels, filters, kernel=3, pad=0):
        super().__init__()
        self.C, self.F, self.K, self.pad = in_channels, filters, kernel, pad
        self.shapes = {"weight": (filters, in_channels, kernel, kernel), "bias": (filters,)}
        self.fan_in = in_channels * kernel * kernel

    def forward(self, x, train=True):
        """x (N, C, H, W) -> out (N, F, H_out, W_out)."""
        N, C, H, W = x.shape
        F, K, p = self.F, self.K, self.pad
        Ho, Wo = H + 2 * p - K + 1, W + 2 * p - K + 1
        xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))         # zeros around each map
        self.x_shape, self.cols = x.shape, im2col(xpad, K)          # cols (C*K*K, N*Ho*Wo)
        w = self.params["weight"].reshape(F, C * K * K)
        out = w @ self.cols + self.params["bias"][:, None]          # (F, N*Ho*Wo)
        # a view of the product as (N, F, Ho, Wo): no copy (NumPy follows the strides)
        return out.reshape(F, N, Ho, Wo).transpose(1, 0, 2, 3)

    def backward(self, dout, need_dx=True):
        """dout (N, F, H_out, W_out) -> dx (N, C, H, W) or None; grads weight, bias.

        With d = dout laid out as (F, N*Ho*Wo) like out = w @ cols + b: dw = d @ cols.T,
        db = d summed along each row, dcols = w.T @ d, and dx adds dcols back through col2im.
        """
        N, C, H, W = self.x_shape
        F, K, p = self.F, self.K, self.pad
        d = dout.transpose(1, 0, 2, 3).reshape(F, -1)               # (F, N*Ho*Wo), like out
        self.grads["weight"][...] = (d @ self.cols.T).reshape(F, C, K, K)
        self.grads["bias"][...] = d.sum(axis=1)
        if not need_dx:
            return None
        dcols = self.params["weight"].reshape(F, C * K * K).T @ d   # (C*K*K, N*Ho*Wo)
        dxpad = col2im(dcols, (N, C, H + 2 * p, W + 2 * p), K)
        return dxpad[:, :, p:p + H, p:p + W]                        # the padding had no input


# --- ReLU -----------------------------------------------------------------
class ReLU(Layer):
    """out = max(x, 0), elementwise; the gradient passes where the input was positive."""
    kind = "relu"

    def forward(self, x, train=True):
        self.positive = x > 0
        return np.maximum(x, 0)

    def backward(self, dout, need_dx=True):
        return dout * self.positive


# --- 2x2 max-pool -----------------------------------------------------------
# out[n, c, i, j] = max over di, dj in {0, 1} of a[n, c, 2i + di, 2j + dj]
# with H_out = H // 2 (an odd last row or column is dropped, as PyTorch does).
# Only the winning input changed the output, so the backward hands each window's
# gradient to exactly one position.  When several tie (whole windows of a blank
# MNIST border are equal), it goes to the first in reading order (top-left,
# top-right, bottom-left, bottom-right).  Giving it to every tied position would
# multiply it, and no longer be the gradient of max.  ReLU never changes which value of a
# window is largest, so max(relu(a)) = relu(max(a)): ReLU then pool = pool then ReLU.
def quarters(a):
    """The four positions of every 2x2 window of a (N, C, H, W): top-left, top-right,
    bottom-left, bottom-right, each a strided view (N, C, H//2, W//2), no copy.  The
    maximum of four views is 20x faster than a.reshape(N, C, H//2, 2, W//2, 2).max(axis=(3, 5))."""
    Hp, Wp = a.shape[2] // 2, a.shape[3] // 2
    return [a[:, :, di:2 * Hp:2, dj:2 * Wp:2] for di in (0, 1) for dj in (0, 1)]


class MaxPool(Layer):
    kind = "pool"

    def forward(self, a, train=True):
        """a (N, C, H, W) -> out (N, C, H//2, W//2).

        The max is a small tournament: top-left vs top-right, bottom-left vs
        bottom-right, then the two winners.  Each match is won by the left or upper
        side unless the other is strictly greater, so a tie goes to the first position.
        """
        tl, tr, bl, br = quarters(a)
        top, bottom = np.maximum(tl, tr), np.maximum(bl, br)
        self.a_shape = a.shape
        self.right_won_top, self.right_won_bottom = tr > tl, br > bl
        self.bottom_won = bottom > top
        return np.maximum(top, bottom)

    def backward(self, dout, need_dx=True):
        """dout (N, C, H//2, W//2) -> da (N, C, H, W): each window's gradient goes back down
        the tournament, to the winning pair, then to the winner within the pair."""
        to_bottom = dout * self.bottom_won
        to_top = dout - to_bottom
        da = np.zeros(self.a_shape, dout.dtype)                     # losers (and a dropped row) get 0
        tl, tr, bl, br = quarters(da)                               # views: writing them writes da
        tr[...] = to_top * self.right_won_top
        tl[...] = to_top - tr                                       # what top-right did not take
        br[...] = to_bottom * self.right_won_bottom
        bl[...] = to_bottom - br
        return da


# --- Batch normalisation -----------------------------------------------------
# Per channel c (axis 1: the channel of a map, the feature of a dense layer's output),
# over the M values of the batch that belong to it (M = N*H*W for maps, N for features):
#   training:   mu = mean(x),  var = mean((x - mu)^2)  (biased: divided by M)
#               xhat = (x - mu) / sqrt(var + eps),  out = gamma * xhat + beta
#               running_mean += m * (mu - running_mean)   m = momentum = 0.1, the new value's weight
#               running_var  += m * (var * M / (M - 1) - running_var)   (unbiased, as PyTorch)
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
                        "num_batches_tracked": np.zeros((), np.int64)}   # counted only: PyTorch's state has it

    def forward(self, x, train=True):
        """x (N, C) or (N, C, H, W) -> out, the same shape."""
        self.axes = (0,) if x.ndim == 2 else (0, 2, 3)         # every axis but the channel's
        self.M = x.size // x.shape[1]                           # values per channel
        if train:
            mean, var = x.mean(axis=self.axes), x.var(axis=self.axes)
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm += self.momentum * (mean - rm)
            rv += self.momentum * (var * self.M / max(self.M - 1, 1) - rv)   # max: one image after an fc
            self.buffers["num_batches_tracked"] += 1
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        self.train = train
        c = self.per_channel = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)     # broadcasts along axis 1
        self.inv_std = (1 / np.sqrt(var + self.eps)).astype(x.dtype).reshape(c)
        self.xhat = (x - mean.astype(x.dtype).reshape(c)) * self.inv_std
        return self.params["weight"].reshape(c) * self.xhat + self.params["bias"].reshape(c)

    def backward(self, dout, need_dx=True):
        dbeta, dgamma = dout.sum(axis=self.axes), (dout * self.xhat).sum(axis=self.axes)
        self.grads["weight"][...], self.grads["bias"][...] = dgamma, dbeta
        if not need_dx:
            return None
        c, M = self.per_channel, self.M
        scale = self.params["weight"].reshape(c) * self.inv_std     # gamma / sqrt(var + eps)
        if not self.train:              # evaluation: mean and var are constants, out is linear in x
            return scale * dout
        return scale * (dout - dbeta.reshape(c) / M - self.xhat * dgamma.reshape(c) / M)


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
        self.mask = (keep / (1 - self.p)).astype(x.dtype)                    # 0 or 1/(1-P)
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
        return x.reshape(len(x), -1)

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
        return x @ self.params["weight"].T + self.params["bias"]

    def backward(self, dout, need_dx=True):
        """dx = dout @ w, dw = dout.T @ x, db = dout summed over the batch."""
        self.grads["weight"][...] = dout.T @ self.x
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
    The gradient of the mean loss is (p - onehot(y)) / N, onehot(y) being 1 at the true
    class and 0 elsewhere; the 1/N because the loss is a mean over the batch, not a sum.
    """
    N = len(y)
    log_p = log_softmax(logits)
    rows = np.arange(N)
    loss = -log_p[rows, y].mean()                # log p of each row's true class
    dlogits = np.exp(log_p)
    dlogits[rows, y] -= 1                        # p - onehot(y)
    return float(loss), dlogits / N


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
    "seed": f"conv{FILTERS} relu pool fc{HIDDEN} relu fc10",     # the original network
    "deep": "conv16p1 bn relu pool conv32p1 bn relu pool fc128 relu fc10",   # 99.3% in 5 epochs
}
CLASSES = 10
INPUT_SHAPE = (1, 28, 28)     # (C, H, W) of one image
LAYER_TYPES = {"conv": Conv, "relu": ReLU, "pool": MaxPool, "bn": BatchNorm,
               "dropout": Dropout, "flatten": Flatten, "fc": Dense}


class Network:
    """The layers in order; all parameters in one flat vector (net.flat), all gradients in
    another (net.grad): an optimizer updates one array; forward walks the list, backward back.

    net.state: name -> array, PyTorch's state_dict names numbered by kind in order of
    appearance (conv1.weight, conv1.bias, bn1.weight, bn1.running_mean, ..., fc2.bias);
    net.params and net.grads: the same names, parameters only, each a view into the flat
    vectors (a window on their memory): a layer writing its gradient in place, with [...] =,
    writes net.grad, and net.flat += step moves every layer's weights.
    net.mean, net.std: the input scaling the network is trained with (see to_input).
    """
    layer_types = LAYER_TYPES                   # the classes the grammar builds (the fast path's are its own)

    def __init__(self, spec, rng, dtype=np.float32, mean=PIXEL_MEAN, std=PIXEL_STD):
        built = build_layers(spec, rng, dtype, self.layer_types)   # [(token, layer, shape)]: section 7
        self.spec = " ".join(token for token, _, _ in built if token != "flatten")
        self.tokens = [token for token, _, _ in built]
        self.layers = [layer for _, layer, _ in built]
        self.shapes = [shape for _, _, shape in built]            # each layer's output shape
        self.mean, self.std = mean, std
        # the input gradient is worth computing only where some layer below learns
        self.learns_below = [any(l.shapes for l in self.layers[:i]) for i in range(len(self.layers))]
        counts, self.named = {}, []                          # conv1, bn1, fc1, fc2, ... numbered by kind
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
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits, input_grad=False):
        """dlogits (N, 10) -> fills self.grad; returns dx (N, 1, 28, 28) if input_grad."""
        dout = dlogits
        for i in reversed(range(len(self.layers))):
            dout = self.layers[i].backward(dout, need_dx=input_grad or self.learns_below[i])
            if dout is None:                      # nothing below this layer learns
                break
        return dout


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
        logits = net.forward(to_input(images_u8[i:i + batch], net.mean, net.std), train=False)
        probs[i:i + batch] = np.exp(log_softmax(logits))
    return probs


# ---------------------------------------------------------------------------
# 4. Optimizers: each keeps its own state per parameter (here, per element of
#    the flat parameter vector) and turns a gradient into an update.
# ---------------------------------------------------------------------------
class Adam:
    """Adam (Kingma and Ba, 2015): a per-parameter step from running means of g and g*g."""

    def __init__(self, size, lr=ADAM_LR, betas=ADAM_BETAS, eps=ADAM_EPS, dtype=np.float32):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.m = np.zeros(size, dtype)      # running mean of g
        self.v = np.zeros(size, dtype)      # running mean of g*g
        self.t = 0

    def update(self, g, lr_scale=1.0):
        """The change to add to the parameters for gradient g."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        self.m = b1 * self.m + (1 - b1) * g                 # 1) running means of g and g*g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1 ** self.t)                 # 2) bias corrections: m and v started at 0,
        v_hat = self.v / (1 - b2 ** self.t)                 #    which pulls early averages toward 0
        return -self.lr * lr_scale * m_hat / (np.sqrt(v_hat) + self.eps)      # 3) the step


class AdamW(Adam):
    """AdamW (Loshchilov and Hutter, 2019): Adam plus decoupled weight decay.

    4) step += -lr * weight_decay * w, for conv and dense weights only (decay_mask: not
       biases, nor batch norm's gamma and beta).  Kept out of the gradient, the decay is not
       weakened by Adam's scaling where gradients are large (as adding it to g, "L2", is).
    """

    def __init__(self, params_flat, decay_mask, lr=ADAM_LR, weight_decay=WEIGHT_DECAY, dtype=np.float32):
        super().__init__(params_flat.size, lr, dtype=dtype)
        self.params = params_flat              # net.flat itself, updated in place: always the current w
        self.decay = decay_mask.astype(dtype) * weight_decay

    def update(self, g, lr_scale=1.0):
        return super().update(g, lr_scale) - (self.lr * lr_scale) * self.decay * self.params   # 4)


class Momentum:
    """SGD with momentum, as PyTorch writes it: velocity = mu*velocity + g, step = -lr*velocity."""

    def __init__(self, size, lr=SGD_LR, momentum=MOMENTUM, dtype=np.float32):
        self.lr, self.mu = lr, momentum
        self.velocity = np.zeros(size, dtype)

    def update(self, g, lr_scale=1.0):
        self.velocity = self.mu * self.velocity + g
        return -self.lr * lr_scale * self.velocity


class Dual:
    """The default (--optimizer dual, from the project's first script): Adam's and momentum's
    updates, both from the same gradient, added each step.  Each part keeps its own state."""

    def __init__(self, size, adam_lr=ADAM_LR, sgd_lr=SGD_LR, momentum=MOMENTUM, dtype=np.float32):
        self.adam = Adam(size, adam_lr, dtype=dtype)
        self.momentum = Momentum(size, sgd_lr, momentum, dtype=dtype)

    def update(self, g, lr_scale=1.0):
        return self.adam.update(g, lr_scale) + self.momentum.update(g, lr_scale)


def cosine_scale(step, total_steps):
    """Learning-rate factor: 1 at the first step, falling along half a cosine towards 0 (the default)."""
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
    progress(images done, images in all, mean loss so far), if given, after every step.
    """
    n = len(train_x)
    order = rng.permutation(n)                # shuffles indices; the caller's data stay as they are
    loss_sum, correct, step = 0.0, 0, step0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = to_input(train_x[idx], net.mean, net.std).astype(net.flat.dtype, copy=False)
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


def train(args, data, out=print, network=Network, optimizer=None, progress=None):
    """Build the network and its optimizer (the chapter's, or the fast path's passed in) and
    train them as args, the parsed flags (section 8), say.  Returns the network, the history
    (one dict per epoch: loss, accuracies, seconds) and the last epoch's test evaluation
    (accuracy, predictions, probabilities).  progress(label) -> a callback for train_epoch."""
    train_x, train_y, test_x, test_y = data
    if args.limit:                                # --limit N: the first N training images only
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    dataset = DATASETS[args.dataset or "mnist"]
    rng = np.random.default_rng(args.seed)      # the run's one generator: weights, order, dropout
    net = network(args.net, rng, mean=dataset.mean, std=dataset.std)
    make = optimizer or make_optimizer              # the fast path's if passed, else section 7's
    opt = make(args.optimizer, net, args.lr, args.sgd_lr, args.momentum, args.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if not args.quiet:
        for line in describe(net):                # each layer and its output shape (section 7)
            out(line)
        out(f"Training on {len(train_x)} images ({steps_per_epoch} steps of {args.batch_size}), testing on "
            f"{len(test_x)}; {args.optimizer} optimizer, {args.schedule} schedule")
    step, history = 0, []
    for epoch in range(1, args.epochs + 1):
        report = progress(f"epoch {epoch}/{args.epochs}") if progress and not args.quiet else None
        t0 = time.perf_counter()
        # a blow-up is reported in plain words by train_epoch's check, not NumPy's warnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss, train_acc, taken = train_epoch(net, opt, train_x, train_y, args.batch_size,
                                                 rng, step, total_steps, args.schedule, report)
        step += taken
        evaluation = evaluate(net, test_x, test_y)
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch, "loss": loss, "train_accuracy": train_acc,
                        "test_accuracy": evaluation[0], "seconds": seconds})
        if not args.quiet:
            out(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  train acc {100 * train_acc:.2f}%  "
                f"test acc {100 * evaluation[0]:.2f}%  {seconds:.1f} s")
    return net, history, evaluation


# ---------------------------------------------------------------------------
# 6. Checking the data files: what load_split relies on.  We read the raw bytes (section 1),
#    so every check is ours: a truncated or wrong file must not slip through.
# ---------------------------------------------------------------------------
def idx_spellings(name):
    """The names a file may have: raw or gzipped, and dotted ('train-images.idx3-ubyte', as some unzip tools)."""
    dotted = name.replace("-idx", ".idx")
    return [name, name + ".gz", dotted, dotted + ".gz"]


def find_idx_file(data_dir, name):
    """Path of the first spelling of `name` present in data_dir, or None."""
    paths = [os.path.join(data_dir, spelling) for spelling in idx_spellings(name)]
    return next((path for path in paths if os.path.isfile(path)), None)


def read_idx(data_dir, name, magic, item_shape, title="MNIST"):
    """Find, read and check one IDX file: its payload as a uint8 array (N, *item_shape)."""
    path = find_idx_file(data_dir, name)
    if path is None:
        raise DataError(f"{os.path.join(data_dir, name)}: missing (also looked for "
                        f"{', '.join(idx_spellings(name)[1:])}); put the {title} files there "
                        "(with the project's tools/ beside this file, it fetches them)")
    try:
        raw = read_idx_bytes(path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); replace it with a good copy") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    header_len = 4 * (2 + len(item_shape))
    if len(raw) < header_len:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header; "
                        "the file is truncated: replace it")
    header = np.frombuffer(raw, dtype=">u4", count=2 + len(item_shape))
    n, shape = int(header[1]), tuple(int(d) for d in header[2:])
    expected = header_len + n * math.prod(item_shape)
    if header[0] != magic:
        what = "images" if magic == IMAGE_MAGIC else "labels"
        raise DataError(f"{path}: magic number {header[0]}, expected {magic}: not {title} {what}; "
                        "replace it with the right file")
    if shape != item_shape:
        raise DataError(f"{path}: items are {shape}, expected {item_shape}: not {title}; replace it")
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes for {n} items, expected {expected}: the file is "
                        f"{'truncated' if len(raw) < expected else 'longer than its header says'}; replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape((n,) + item_shape)


def check_labels(images, labels, data_dir, split, title="MNIST"):
    """As many labels as images, every label a class (0-9)."""
    images_path, labels_path = (find_idx_file(data_dir, IDX_NAMES[f"{split}_{kind}"])
                                for kind in ("images", "labels"))
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} "
                        f"has {len(labels)} labels: the two files do not belong together")
    if len(labels) and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{labels_path}: label {labels[bad]} at index {bad}; "
                        f"{title} labels are 0-9: replace the file")


# ---------------------------------------------------------------------------
# 7. The --net grammar (section 3) read and built into layers, each checked against the
#    shape it receives; optimizers by name; a network described.
# ---------------------------------------------------------------------------
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
    if token.lower() != token:
        raise SpecError(f"{token!r}: tokens are lower-case ({token.lower()!r})")
    raise SpecError(f"{token!r}: not a layer (convF[xK][pP] bn relu pool dropoutP fcM) or preset "
                    f"({' '.join(PRESETS)})")


def build_layers(spec, rng, dtype=np.float32, types=LAYER_TYPES):
    """[(token, layer, shape after it)] for a spec, each layer checked against the shape it
    receives (a Flatten goes in before a dense layer that follows a map); SpecError naming
    the first bad token.  types: the layer classes (the chapter's or the fast path's)."""
    layers, shape = [], INPUT_SHAPE
    # the tokens, split at spaces and commas; a preset's name stands for its spec
    tokens = [t for t in re.split(r"[,\s]+", PRESETS.get(spec.strip(), spec).strip()) if t]
    if not tokens:
        raise SpecError("the network is empty; e.g. --net seed or --net 'conv8 relu pool fc10'")
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
            layer, shape = types["conv"](C, F, K, pad), (F, H + 2 * pad - K + 1, W + 2 * pad - K + 1)
        elif kind == "pool":
            C, H, W = shape
            if H < 2 or W < 2:
                raise SpecError(f"{token!r}: a 2x2 pool needs a map of at least 2x2, it gets {H}x{W}")
            layer, shape = types["pool"](), (C, H // 2, W // 2)
        elif kind == "fc":
            if is_map:
                shape = (math.prod(shape),)
                layers.append(("flatten", types["flatten"](), shape))
            layer, shape = types["fc"](shape[0], numbers[0]), (numbers[0],)
        elif kind == "bn":
            layer = types["bn"](shape[0], dtype=dtype)
        elif kind == "relu":
            layer = types["relu"]()
        else:
            layer = types["dropout"](numbers[0], rng)
        layers.append((token, layer, shape))
    if len(shape) == 3:
        raise SpecError(f"the map {shape} after {tokens[-1]!r} reaches the end: end with fc{CLASSES}")
    if tokens[-1] != f"fc{CLASSES}":
        raise SpecError(f"{tokens[-1]!r} is last: the last layer must be fc{CLASSES}, one score per class")
    return layers


OPTIMIZERS = {"dual": Dual, "adam": Adam, "adamw": AdamW, "momentum": Momentum}


def make_optimizer(name, net, adam_lr=ADAM_LR, sgd_lr=SGD_LR, momentum=MOMENTUM,
                   weight_decay=WEIGHT_DECAY, kinds=OPTIMIZERS):
    """--optimizer's choice for net's flat parameters (kinds: the classes, the fast path's or ours)."""
    size, dtype = net.flat.size, net.flat.dtype
    if name == "adam":
        return kinds["adam"](size, adam_lr, dtype=dtype)
    if name == "adamw":
        return kinds["adamw"](net.flat, net.decay_mask, adam_lr, weight_decay, dtype=dtype)
    if name == "momentum":
        return kinds["momentum"](size, sgd_lr, momentum, dtype=dtype)
    return kinds["dual"](size, adam_lr, sgd_lr, momentum, dtype=dtype)


def describe(net):
    """Start-up lines: the spec as one copyable line, then each layer's output shape."""
    lines = [f"network --net \"{net.spec}\"", f"  {'input':18s} {INPUT_SHAPE}"]
    names = {layer: prefix for prefix, layer in net.named}
    for token, layer, shape in zip(net.tokens, net.layers, net.shapes):
        count = sum(math.prod(s) for s in layer.shapes.values())
        label = f"{token} ({names[layer]})" if layer in names else token
        lines.append(f"  {label:18s} {shape}" if not count else
                     f"  {label:18s} {str(shape):16s}{count:>9,} parameters")
    lines.append(f"  {net.flat.size:,} parameters in all")
    return lines


# ---------------------------------------------------------------------------
# 8. The predictions log, and the command line.
# ---------------------------------------------------------------------------
def log_text(pred, labels, header_lines):
    """The predictions log: '#' header lines, then 'prediction actual' per test image."""
    rows = [f"{p} {a}" for p, a in zip(pred.tolist(), labels.tolist())]
    return "\n".join([f"# {h}" for h in header_lines] + ["# prediction actual"] + rows) + "\n"


def choose_layers(args, out=print):
    """(network class, optimizer maker): the fast path's, unless --plain, or fast_layers.py is not
    here, or it differs from this file on one batch (a learner's edit runs, and they are told)."""
    say = (lambda line: None) if args.quiet else out
    try:
        import fast_layers
    except ModuleNotFoundError as e:
        if e.name != "fast_layers":
            raise
        fast_layers = None
    if args.plain or not fast_layers:
        say(f"layers: this file's own ({'--plain' if args.plain else 'fast_layers.py is not here'})")
        return Network, make_optimizer
    difference = fast_layers.differs_from_chapter(args.net, args.optimizer)
    if difference:
        out(f"layers: the chapter's layers differ from the fast path's: running the chapter ({difference})")
        return Network, make_optimizer
    # how many processes: the page (--serve) trains beside its server's threads, so in one
    say(f"layers: the fast path (fast_layers.py), "
        f"{fast_layers.processes_in_words(args.batch_size, getattr(args, 'serve', False))}")
    return fast_layers.FastNetwork, fast_layers.make_optimizer


def checked(convert, ok, rule):
    """An argparse type: convert the text, then refuse a value for which ok(value) is false."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{' whole' if convert is int else ''} number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive whole number")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def basic_parser():
    """The flags this file serves by itself; tools/command_line.py adds the rest."""
    p = argparse.ArgumentParser(
        prog="mnist_net.py", description="Train a small CNN on MNIST (or Fashion-MNIST) in NumPy, print "
        "the test accuracy and write every test prediction to a log.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=min(shutil.get_terminal_size()[0] - 2, 100)))
    p.add_argument("--epochs", type=positive_int, default=EPOCHS, help="passes over the training set (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per training step (default: {BATCH_SIZE}; {DEEP_BATCH_SIZE} with --net deep)")
    p.add_argument("--net", metavar="SPEC", default=None,
                   help="the layers in order, e.g. \"conv8 relu pool fc128 relu fc10\", or a preset: "
                        + ", ".join(f"{name} ({spec})" for name, spec in PRESETS.items()) + " (default: seed)")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="dual",
                   help="dual adds Adam's and momentum's steps, as the original did (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=ADAM_LR,
                   help="Adam's learning rate, used by adam, adamw and dual (default: %(default)s)")
    p.add_argument("--seed", type=checked(int, lambda v: v >= 0, "a whole number, 0 or more"), default=SEED,
                   help="seed for the initial weights, the shuffling and dropout (default: %(default)s)")
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None,
                   help="mnist: handwritten digits; fashion: Fashion-MNIST, 10 kinds of clothing in the "
                        "same format, much harder (default: mnist)")
    p.add_argument("--data-dir", default=None, help="folder with the four IDX files "
                   "(default: mnist_data/ beside this file; mnist_data/fashion/ for Fashion-MNIST)")
    p.add_argument("--log-file", help=f"where to write every test prediction (default: {LOG_FILE})")
    p.add_argument("--plain", action="store_true", help="run this file's layers, not fast_layers.py's")
    p.add_argument("--quiet", action="store_true", help="print only the final results")
    p.set_defaults(sgd_lr=SGD_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, schedule="cosine", limit=None)
    return p


def basic_checks(args, p):
    """Settle --batch-size and --net; a bad spec stops here in one line naming the token (exit 2)."""
    if args.batch_size is None:
        args.batch_size = DEEP_BATCH_SIZE if (args.net or "").strip() == "deep" else BATCH_SIZE
    try:
        args.net = Network(args.net or "seed", np.random.default_rng(0)).spec
    except SpecError as e:
        p.exit(2, f"error: --net: {e}\n")
    return args


def run_alone(args, out=print):
    """The whole job with this file alone: data, training, evaluation, the log."""
    dataset = DATASETS[args.dataset or "mnist"]
    data = load_mnist(args.data_dir or dataset.folder, dataset.title)
    net, _, (accuracy, pred, _) = train(args, data, out, *choose_layers(args, out))
    test_y = data[3]
    header = [f"mnist_net  epochs={args.epochs} batch_size={args.batch_size} optimizer={args.optimizer} "
              f"lr={args.lr} seed={args.seed} net=\"{net.spec}\"",
              f"test accuracy {100 * accuracy:.2f}% on {len(test_y)} {dataset.title} images"]
    with open(args.log_file or LOG_FILE, "w") as f:     # only now: a failed run leaves the old log
        f.write(log_text(pred, test_y, header))
    out(f"Full {dataset.title} test accuracy: {100 * accuracy:.2f}%")
    out(f"Predictions: {pred[:10]}")
    out(f"Actual:      {test_y[:10]}")
    out(f"Wrote {len(pred)} predictions to {args.log_file or LOG_FILE}")
    return 0


def main(argv=None):
    """The project's full command line (tools/command_line.py) when tools/ is here, else this file's."""
    try:
        from tools import command_line
    except ModuleNotFoundError as e:
        if e.name not in ("tools", "tools.command_line"):
            raise
    else:
        return command_line.main(argv)
    p = basic_parser()
    args = basic_checks(p.parse_args(argv), p)
    try:
        return run_alone(args)
    except (DataError, NonFiniteLoss, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nInterrupted; the log was not written.", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    # Run as a script, this file is the module __main__; importing it by name makes it the
    # one module mnist_net that the tools import too (one copy of every class and setting).
    import mnist_net
    sys.exit(mnist_net.main())
