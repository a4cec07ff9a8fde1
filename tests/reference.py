"""Plain loop versions of the layers and of whole networks, written from the formulas
one output at a time: the references the chapter's vectorised layers (mnist_net.py) are
checked against in tests/test_layers.py.  The pool-order helpers at the end describe the
fast path's layout (fast_layers.py) for tests/test_fast_path.py, and the comparison of two
networks' gradients both fast-path test files use.
"""
import math

import numpy as np

import mnist_net as m
from tools.gradcheck import numeric_gradient, relative_error  # noqa: F401 (the ones --gradcheck uses)


# --- convolution -------------------------------------------------------------------------
def conv_naive(x, w, b, pad=0):
    """x (N, C, H, W), w (F, C, K, K), b (F,) -> (N, F, H+2pad-K+1, W+2pad-K+1), one sum per output."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    Ho, Wo = H - KH + 1, W - KW + 1
    out = np.zeros((N, F, Ho, Wo), x.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(Ho):
                for j in range(Wo):
                    out[n, f, i, j] = np.sum(x[n, :, i:i + KH, j:j + KW] * w[f]) + b[f]
    return out


def conv_backward_naive(x, w, dout, pad=0):
    """(dx, dw, db) of out[n,f,i,j] = b[f] + sum w[f,c,ki,kj] xpad[n,c,i+ki,j+kj], one output
    pixel at a time: each adds its dout to db[f], dout times its patch to dw[f], and dout
    times w[f] to the patch of dxpad it was computed from."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    K = w.shape[2]
    dw, db, dxp = np.zeros_like(w), np.zeros(w.shape[0], dout.dtype), np.zeros_like(xp)
    for n, f, i, j in np.ndindex(dout.shape):
        db[f] += dout[n, f, i, j]
        dw[f] += dout[n, f, i, j] * xp[n, :, i:i + K, j:j + K]
        dxp[n, :, i:i + K, j:j + K] += dout[n, f, i, j] * w[f]
    H, W = x.shape[2:]
    return dxp[:, :, pad:pad + H, pad:pad + W], dw, db


def im2col_naive(xpad, K):
    """xpad (N, C, Hp, Wp) -> (C*K*K, N*Ho*Wo), the chapter's layout, one entry at a time:
    row c*K*K + ki*K + kj, column n*Ho*Wo + i*Wo + j holds xpad[n, c, i + ki, j + kj]."""
    N, C, Hp, Wp = xpad.shape
    Ho, Wo = Hp - K + 1, Wp - K + 1
    cols = np.zeros((C * K * K, N * Ho * Wo), xpad.dtype)
    for c, ki, kj, n, i, j in np.ndindex(C, K, K, N, Ho, Wo):
        cols[c * K * K + ki * K + kj, (n * Ho + i) * Wo + j] = xpad[n, c, i + ki, j + kj]
    return cols


def col2im_naive(cols, xpad_shape, K):
    """The adjoint of im2col_naive, one entry at a time: each entry added onto its pixel."""
    N, C, Hp, Wp = xpad_shape
    Ho, Wo = Hp - K + 1, Wp - K + 1
    dx = np.zeros(xpad_shape, cols.dtype)
    for c, ki, kj, n, i, j in np.ndindex(C, K, K, N, Ho, Wo):
        dx[n, c, i + ki, j + kj] += cols[c * K * K + ki * K + kj, (n * Ho + i) * Wo + j]
    return dx


# --- ReLU, pool ----------------------------------------------------------------------------
def relu_naive(x):
    """max(x, 0), one value at a time."""
    out = np.zeros(x.shape, x.dtype)
    for i in np.ndindex(x.shape):
        out[i] = x[i] if x[i] > 0 else 0.0
    return out


def maxpool_naive(a):
    """a (N, C, H, W) -> (N, C, H//2, W//2), the max of each 2x2 window (odd edges dropped)."""
    N, C, H, W = a.shape
    out = np.zeros((N, C, H // 2, W // 2), a.dtype)
    for n in range(N):
        for c in range(C):
            for p in range(H // 2):
                for q in range(W // 2):
                    out[n, c, p, q] = a[n, c, 2 * p:2 * p + 2, 2 * q:2 * q + 2].max()
    return out


def maxpool_backward_naive(a, dout):
    """Each window's gradient to the first position (reading order) holding its max."""
    da = np.zeros_like(a)
    N, C, H, W = a.shape
    for n in range(N):
        for c in range(C):
            for p in range(H // 2):
                for q in range(W // 2):
                    window = a[n, c, 2 * p:2 * p + 2, 2 * q:2 * q + 2]
                    k = int(np.argmax(window))           # argmax: the first of tied maxima
                    da[n, c, 2 * p + k // 2, 2 * q + k % 2] = dout[n, c, p, q]
    return da


# --- batch norm ----------------------------------------------------------------------------
def batchnorm_naive(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm, channel by channel with Python loops over channels:
    (normalised output, batch mean, biased variance)."""
    C = x.shape[1]
    out = np.zeros_like(x)
    means, variances = np.zeros(C), np.zeros(C)
    for c in range(C):
        values = x[:, c]
        mean = values.sum() / values.size
        var = ((values - mean) ** 2).sum() / values.size
        out[:, c] = gamma[c] * (values - mean) / np.sqrt(var + eps) + beta[c]
        means[c], variances[c] = mean, var
    return out, means, variances


def batchnorm_eval_naive(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Evaluation-mode batch norm, channel by channel: the running statistics, not the batch's."""
    out = np.zeros_like(x)
    for c in range(x.shape[1]):
        out[:, c] = gamma[c] * (x[:, c] - running_mean[c]) / math.sqrt(running_var[c] + eps) + beta[c]
    return out


def batchnorm_backward_naive(x, gamma, dout, eps=1e-5):
    """(dx, dgamma, dbeta) of training-mode batch norm, channel by channel, through the
    computation graph one stage at a time (CS231n's staged form, not the chapter's folded
    formula): xhat = (x - mu) / sqrt(var + eps), out = gamma * xhat + beta."""
    dx = np.zeros_like(x)
    dgamma, dbeta = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for c in range(x.shape[1]):
        v, g = x[:, c], dout[:, c]
        M = v.size
        mu = v.sum() / M
        var = ((v - mu) ** 2).sum() / M
        xhat = (v - mu) / math.sqrt(var + eps)
        dbeta[c], dgamma[c] = g.sum(), (g * xhat).sum()
        dxhat = g * gamma[c]
        dvar = (dxhat * (v - mu)).sum() * -0.5 * (var + eps) ** -1.5
        dmu = -dxhat.sum() / math.sqrt(var + eps) + dvar * (-2 * (v - mu)).sum() / M
        dx[:, c] = dxhat / math.sqrt(var + eps) + dvar * 2 * (v - mu) / M + dmu / M
    return dx, dgamma, dbeta


# --- dropout, flatten, dense, softmax ------------------------------------------------------
def dropout_naive(x, keep, p):
    """Inverted dropout with a given mask of kept values: x / (1 - p) where kept, else 0."""
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        out[i] = x[i] / (1 - p) if keep[i] else 0.0
    return out


def flatten_naive(x):
    """(N, C, H, W) -> (N, C*H*W), each image's values in (channel, row, column) order."""
    N, C, H, W = x.shape
    out = np.zeros((N, C * H * W), x.dtype)
    for n, c, i, j in np.ndindex(x.shape):
        out[n, (c * H + i) * W + j] = x[n, c, i, j]
    return out


def dense_naive(x, w, b):
    """x (N, D), w (M, D), b (M,) -> (N, M), one dot product per output."""
    N, M = len(x), len(b)
    out = np.zeros((N, M), x.dtype)
    for n in range(N):
        for k in range(M):
            out[n, k] = sum(x[n, d] * w[k, d] for d in range(x.shape[1])) + b[k]
    return out


def softmax_cross_entropy_naive(z, y):
    """Mean over the rows of -log softmax(z)[y], with Python floats and math.fsum, the
    log-sum-exp taken around each row's max."""
    losses = []
    for row, label in zip(z, y):
        top = max(row)
        log_sum = top + math.log(math.fsum(math.exp(v - top) for v in row))
        losses.append(log_sum - row[label])
    return math.fsum(losses) / len(losses)


# --- whole networks ------------------------------------------------------------------------
def network_naive(net, x, train=False):
    """Logits (N, 10) of a Network computed the way PyTorch's Sequential would, layer by
    layer in the order written, with the plain loops above.  Dropout is left out (use it
    only in evaluation, or with P = 0)."""
    h = x
    for token, layer in zip(net.tokens, net.layers):
        if isinstance(layer, m.Conv):
            h = conv_naive(h, layer.params["weight"], layer.params["bias"], layer.pad)
        elif isinstance(layer, m.ReLU):
            h = np.maximum(h, 0)
        elif isinstance(layer, m.MaxPool):
            h = maxpool_naive(h)
        elif isinstance(layer, m.BatchNorm):
            gamma, beta = layer.params["weight"], layer.params["bias"]
            if train:
                h = batchnorm_naive(h, gamma, beta)[0]
            else:
                h = batchnorm_eval_naive(h, gamma, beta, layer.buffers["running_mean"],
                                         layer.buffers["running_var"])
        elif isinstance(layer, m.Flatten):
            h = h.reshape(len(h), -1)
        elif isinstance(layer, m.Dense):
            h = h @ layer.params["weight"].T + layer.params["bias"]
        elif isinstance(layer, m.Dropout):
            pass
        else:
            raise AssertionError(f"no reference for {token}")
    return h


# --- the fast path's pool order (fast_layers.py) ----------------------------------------------
def pool_order_to_natural(z):
    """(4, F, N, Hp, Wp) in pool order -> (N, F, 2Hp, 2Wp), the ordinary image layout."""
    _, F, N, Hp, Wp = z.shape
    out = np.zeros((N, F, 2 * Hp, 2 * Wp), z.dtype)
    for di in range(2):
        for dj in range(2):
            out[:, :, di::2, dj::2] = z[2 * di + dj].transpose(1, 0, 2, 3)
    return out


def natural_to_pool_order(a):
    """(N, F, 2Hp, 2Wp) -> (4, F, N, Hp, Wp), the inverse of pool_order_to_natural."""
    N, F, H, W = a.shape
    out = np.zeros((4, F, N, H // 2, W // 2), a.dtype)
    for di in range(2):
        for dj in range(2):
            out[2 * di + dj] = a[:, :, di::2, dj::2].transpose(1, 0, 2, 3)
    return out


def im2col_pool_order_naive(xp, K):
    """xp (C, N, Hpad, Wpad), the fast path's channel-first input -> (4, C*K*K, N*Hp*Wp):
    the column of output pixel (n, 2p + di, 2q + dj) in block 2*di + dj, column (n, p, q).
    No rows of ones."""
    C, N, Hpad, Wpad = xp.shape
    Ho, Wo = Hpad - K + 1, Wpad - K + 1
    Hp, Wp = Ho // 2, Wo // 2
    plain = im2col_naive(xp.transpose(1, 0, 2, 3), K)
    out = np.zeros((4, C * K * K, N * Hp * Wp), xp.dtype)
    for n in range(N):
        for i in range(2 * Hp):
            for j in range(2 * Wp):
                out[2 * (i % 2) + j % 2, :, (n * Hp + i // 2) * Wp + j // 2] = plain[:, (n * Ho + i) * Wo + j]
    return out


# --- a test input, not a layer: every way a pool window can tie ---------------------------
def every_tie_pattern(odd_edge=False):
    """(1, 2, 2, 30) maps, one 2x2 window for each of the 15 sets of positions that hold
    the window's max (1 over 0 in channel 0; -1 over -2 in channel 1); window 0 is the
    four-way tie of a blank border.  odd_edge: a 31st column and 3rd row of larger values,
    which the pool drops."""
    a = np.zeros((1, 2, 2, 30))
    a[0, 1] = -2.0
    for k, winners in enumerate(sorted(range(1, 16), key=lambda bits: -bin(bits).count("1"))):
        for position in range(4):
            if winners >> position & 1:
                a[0, :, position // 2, 2 * k + position % 2] += 1.0
    if odd_edge:
        a = np.pad(a, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=5.0)
    return a


# --- whole networks compared (tests/test_fast_path.py, tests/test_two_cores.py) --------------
def assert_gradients_equal(fast, chapter, zero_names, rtol):
    """Every gradient within rtol (relative, over the whole array), except those that are 0
    but for rounding: the ones named (a bias right before batch norm), and any other the data
    make 0 (a bias whose ReLU passes every value of the batch, before batch norm).  Those
    are compared absolutely."""
    assert list(fast.grads) == list(chapter.grads)
    for name, g in chapter.grads.items():
        f = fast.grads[name]
        if name in zero_names or np.abs(g).max() < 1e-12:
            assert np.abs(g).max() < 1e-12 and np.abs(f).max() < 1e-12, name
        else:
            error = np.linalg.norm(f - g) / np.linalg.norm(g)
            assert error <= rtol, (name, error)
