"""Plain loop versions of the layers and of whole networks, written from the
formulas with no layout tricks: the references the fast code is checked against.
"""
import numpy as np

import mnist_net as m
from tools.gradcheck import numeric_gradient, relative_error  # noqa: F401 (the ones --gradcheck uses)


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


def network_naive(net, x, train=False):
    """Logits (N, 10) of a Network computed the way PyTorch's Sequential would, layer by
    layer in the order written, with the plain loops above and no layout agreements.
    Dropout is left out (use it only in evaluation, or with P = 0)."""
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
                shape = (1, -1) + (1,) * (h.ndim - 2)
                mean = layer.buffers["running_mean"].reshape(shape)
                var = layer.buffers["running_var"].reshape(shape)
                h = gamma.reshape(shape) * (h - mean) / np.sqrt(var + 1e-5) + beta.reshape(shape)
        elif isinstance(layer, m.Flatten):
            h = h.reshape(len(h), -1)
        elif isinstance(layer, m.Dense):
            h = h @ layer.params["weight"].T + layer.params["bias"]
        elif isinstance(layer, m.Dropout):
            pass
        else:
            raise AssertionError(f"no reference for {token}")
    return h


def im2col_naive(xp, K):
    """xp (C, N, Hpad, Wpad) -> (C*K*K, N*Ho*Wo), one patch per column, a loop per entry:
    row c*K*K + ki*K + kj, column (n, i, j) holds xp[c, n, i + ki, j + kj].  No row of ones."""
    C, N, Hpad, Wpad = xp.shape
    Ho, Wo = Hpad - K + 1, Wpad - K + 1
    cols = np.zeros((C * K * K, N * Ho * Wo), xp.dtype)
    for c in range(C):
        for ki in range(K):
            for kj in range(K):
                for n in range(N):
                    for i in range(Ho):
                        for j in range(Wo):
                            cols[c * K * K + ki * K + kj, (n * Ho + i) * Wo + j] = xp[c, n, i + ki, j + kj]
    return cols


def im2col_pool_order_naive(xp, K):
    """xp (C, N, Hpad, Wpad) -> (4, C*K*K, N*Hp*Wp): im2col_naive's column of output pixel
    (n, 2p + di, 2q + dj) moved to block 2*di + dj, column (n, p, q).  No rows of ones."""
    C, N, Hpad, Wpad = xp.shape
    Ho, Wo = Hpad - K + 1, Wpad - K + 1
    Hp, Wp = Ho // 2, Wo // 2
    plain = im2col_naive(xp, K)
    out = np.zeros((4, C * K * K, N * Hp * Wp), xp.dtype)
    for n in range(N):
        for i in range(2 * Hp):
            for j in range(2 * Wp):
                out[2 * (i % 2) + j % 2, :, (n * Hp + i // 2) * Wp + j // 2] = plain[:, (n * Ho + i) * Wo + j]
    return out


def relu_naive(x):
    """max(x, 0), one value at a time."""
    out = np.zeros(x.shape, x.dtype)
    for i in np.ndindex(x.shape):
        out[i] = x[i] if x[i] > 0 else 0.0
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
    import math
    losses = []
    for row, label in zip(z, y):
        top = max(row)
        log_sum = top + math.log(math.fsum(math.exp(v - top) for v in row))
        losses.append(log_sum - row[label])
    return math.fsum(losses) / len(losses)


# gradcheck's numeric_gradient changes every entry through the view itself: any memory order works
numeric_gradient_strided = numeric_gradient
