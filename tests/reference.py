"""Plain loop versions of the layers and of the whole network, written from the
formulas with no layout tricks: the references the fast code is checked against.
"""
import numpy as np

import mnist_tools


def conv_naive(x, w, b):
    """x (N, C, H, W), w (F, C, KH, KW), b (F,) -> (N, F, H-KH+1, W-KW+1), one sum per output."""
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
    """a (N, F, H, W) -> (N, F, H/2, W/2), the max of each 2x2 window."""
    N, F, H, W = a.shape
    out = np.zeros((N, F, H // 2, W // 2), a.dtype)
    for n in range(N):
        for f in range(F):
            for p in range(H // 2):
                for q in range(W // 2):
                    out[n, f, p, q] = a[n, f, 2 * p:2 * p + 2, 2 * q:2 * q + 2].max()
    return out


def pool_order_to_natural(z):
    """(F, 4, N, Hp, Wp) in pool order -> (N, F, 2Hp, 2Wp), the ordinary image layout."""
    F, _, N, Hp, Wp = z.shape
    out = np.zeros((N, F, 2 * Hp, 2 * Wp), z.dtype)
    for di in range(2):
        for dj in range(2):
            out[:, :, di::2, dj::2] = z[:, 2 * di + dj].transpose(1, 0, 2, 3)
    return out


def natural_to_pool_order(a):
    """(N, F, 2Hp, 2Wp) -> (F, 4, N, Hp, Wp), the inverse of pool_order_to_natural."""
    N, F, H, W = a.shape
    out = np.zeros((F, 4, N, H // 2, W // 2), a.dtype)
    for di in range(2):
        for dj in range(2):
            out[:, 2 * di + dj] = a[:, :, di::2, dj::2].transpose(1, 0, 2, 3)
    return out


def network_naive(params, x):
    """Logits (N, 10) computed the way PyTorch's Sequential would: conv + bias, ReLU,
    pool, flatten in (channel, row, column) order, dense, ReLU, dense."""
    z = conv_naive(x, params["conv.weight"], params["conv.bias"])
    a = np.maximum(z, 0)
    p = maxpool_naive(a)
    h0 = p.reshape(len(x), -1)
    h1 = np.maximum(h0 @ params["fc1.weight"].T + params["fc1.bias"], 0)
    return h1 @ params["fc2.weight"].T + params["fc2.bias"]


# the finite differences and the error measure are the ones --gradcheck uses
numeric_gradient = mnist_tools.numeric_gradient
relative_error = mnist_tools.relative_error
