"""Every layer: the fast version against a plain loop, and every backward pass
against centered finite differences in float64."""
import math

import numpy as np
import pytest

import mnist_net as m
from reference import (conv_naive, maxpool_naive, natural_to_pool_order, network_naive,
                       numeric_gradient, pool_order_to_natural, relative_error)

TOL = 1e-6


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- fast against naive -------------------------------------------------------
# (9, ...) and (16, ...) run the products in several column chunks (4 and 32 maps each)
@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (3, 2, 10, 6), (1, 1, 28, 28), (9, 1, 6, 6), (16, 2, 6, 8)])
def test_im2col_conv_matches_loop_convolution(rng, shape):
    x = rng.standard_normal(shape)
    w = rng.standard_normal((4, shape[1], 3, 3))
    b = rng.standard_normal(4)
    out, _ = m.conv_forward(x, w, b)
    np.testing.assert_allclose(pool_order_to_natural(out), conv_naive(x, w, b), rtol=1e-12, atol=1e-12)


def test_im2col_reuses_its_workspace_buffer(rng):
    x = rng.standard_normal((2, 1, 8, 8))
    ws = {}
    first = m.im2col(x, ws)
    second = m.im2col(x + 1, ws)
    assert np.shares_memory(first, second)                 # the same buffer, refilled
    w = rng.standard_normal((2, 1, 3, 3))
    out, _ = m.conv_forward(x + 1, w, np.zeros(2))
    np.testing.assert_allclose(pool_order_to_natural(out), conv_naive(x + 1, w, np.zeros(2)))


def test_maxpool_matches_loop_pool(rng):
    a = rng.standard_normal((3, 5, 8, 8))                  # (N, F, H, W)
    out, _ = m.maxpool_forward(natural_to_pool_order(a))   # (F, N, 4, 4)
    np.testing.assert_array_equal(out.transpose(1, 0, 2, 3), maxpool_naive(a))


def test_network_matches_plain_pytorch_order_forward(rng):
    """Bias and ReLU after the pool, the pool-ordered layout and the flatten give
    exactly the logits of conv + bias -> ReLU -> pool -> flatten(C, H, W) -> dense."""
    _, params = m.init_params(rng, filters=3, hidden=7, dtype=np.float64)
    x = rng.standard_normal((4, 1, 28, 28))
    logits, _ = m.forward(params, x)
    np.testing.assert_allclose(logits, network_naive(params, x), rtol=1e-10, atol=1e-12)


# --- gradient checks, float64, centered differences --------------------------
def test_conv_gradients(rng):
    x = rng.standard_normal((2, 2, 8, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    r = rng.standard_normal((3, 4, 2, 3, 2))               # weights of a scalar loss
    loss = lambda: np.sum(m.conv_forward(x, w, b)[0] * r)
    out, cache = m.conv_forward(x, w, b)
    dx, dw, db = m.conv_backward(r, cache)
    assert relative_error(dw, numeric_gradient(loss, w)) < TOL
    assert relative_error(db, numeric_gradient(loss, b)) < TOL
    assert relative_error(dx, numeric_gradient(loss, x)) < TOL
    _, dw2, db2 = m.conv_backward(r, cache, need_dx=False)
    np.testing.assert_array_equal(dw2, dw)


def test_conv_gradients_without_bias_over_several_chunks(rng):
    x = rng.standard_normal((16, 1, 6, 6))                 # 64 maps: two column chunks of 32
    w = rng.standard_normal((2, 1, 3, 3))
    r = rng.standard_normal((2, 4, 16, 2, 2))
    loss = lambda: np.sum(m.conv_forward(x, w, None)[0] * r)
    dx, dw, db = m.conv_backward(r, m.conv_forward(x, w, None)[1])
    assert db is None                                      # no bias in the forward, none to learn
    assert relative_error(dw, numeric_gradient(loss, w)) < TOL
    assert relative_error(dx, numeric_gradient(loss, x)) < TOL


def test_relu_gradient(rng):
    x = rng.standard_normal((4, 7))
    x[np.abs(x) < 1e-3] = 0.5                               # keep away from the kink at 0
    r = rng.standard_normal((4, 7))
    loss = lambda: np.sum(m.relu_forward(x)[0] * r)
    _, cache = m.relu_forward(x)
    dx = m.relu_backward(r, cache)
    assert relative_error(dx, numeric_gradient(loss, x)) < TOL
    assert np.all(dx[x < 0] == 0)


def test_maxpool_gradient(rng):
    a = rng.standard_normal((2, 4, 3, 3, 3))               # no ties in random floats
    r = rng.standard_normal((2, 3, 3, 3))
    loss = lambda: np.sum(m.maxpool_forward(a)[0] * r)
    _, cache = m.maxpool_forward(a)
    da = m.maxpool_backward(r, cache)
    assert relative_error(da, numeric_gradient(loss, a)) < TOL


def test_maxpool_gives_tied_windows_gradient_to_first_position_only():
    a = np.zeros((1, 4, 1, 1, 3))                          # three windows, (F, 4, N, Hp, Wp)
    # window 0: all four tied (a blank border); window 1: positions 1 and 3 tie at 5;
    # window 2: positions 2 and 3 tie at -1, the rest lower
    a[0, :, 0, 0, 1] = [1, 5, 2, 5]
    a[0, :, 0, 0, 2] = [-3, -2, -1, -1]
    dout = np.array([[[[2.0, 3.0, 4.0]]]])
    out, cache = m.maxpool_forward(a)
    np.testing.assert_array_equal(out[0, 0, 0], [0, 5, -1])
    da = m.maxpool_backward(dout, cache)
    expected = np.zeros_like(a)
    expected[0, 0, 0, 0, 0] = 2.0                          # top-left, first in reading order
    expected[0, 1, 0, 0, 1] = 3.0                          # top-right, before bottom-right
    expected[0, 2, 0, 0, 2] = 4.0                          # bottom-left, before bottom-right
    np.testing.assert_array_equal(da, expected)


def test_maxpool_ties_on_real_layout_conserve_gradient():
    """A blank image: every window ties; the pool must pass each gradient on once."""
    a = natural_to_pool_order(np.zeros((2, 3, 6, 6)))
    dout = np.arange(2 * 3 * 3 * 3, dtype=float).reshape(3, 2, 3, 3) + 1
    _, cache = m.maxpool_forward(a)
    da = m.maxpool_backward(dout, cache)
    assert np.count_nonzero(da) == dout.size
    np.testing.assert_array_equal(da[:, 0], dout)          # all to the top-left position


def test_dense_gradients(rng):
    x = rng.standard_normal((5, 6))
    w = rng.standard_normal((4, 6))
    b = rng.standard_normal(4)
    r = rng.standard_normal((5, 4))
    loss = lambda: np.sum(m.dense_forward(x, w, b)[0] * r)
    _, cache = m.dense_forward(x, w, b)
    dx, dw, db = m.dense_backward(r, cache)
    assert relative_error(dx, numeric_gradient(loss, x)) < TOL
    assert relative_error(dw, numeric_gradient(loss, w)) < TOL
    assert relative_error(db, numeric_gradient(loss, b)) < TOL


def test_softmax_cross_entropy_value_and_gradient(rng):
    z = rng.standard_normal((6, 10)) * 3
    y = rng.integers(0, 10, 6)
    loss, dz = m.softmax_cross_entropy(z, y)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), y])), rel=1e-12)
    assert relative_error(dz, numeric_gradient(lambda: m.softmax_cross_entropy(z, y)[0], z)) < TOL


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0] + [0.0] * 7, [-1e4] * 9 + [1e4]])
    loss, dz = m.softmax_cross_entropy(z, np.array([2, 9]))
    assert math.isfinite(loss) and np.all(np.isfinite(dz))
    assert loss == pytest.approx(1000.0, rel=1e-9)         # (2000 for image 0 + 0 for image 1) / 2


def test_whole_network_gradients(rng):
    _, params = m.init_params(rng, filters=2, hidden=5, dtype=np.float64)
    x = rng.standard_normal((3, 1, 28, 28))
    y = np.array([3, 7, 0])

    def loss():
        return m.softmax_cross_entropy(m.forward(params, x)[0], y)[0]

    logits, caches = m.forward(params, x)
    _, dlogits = m.softmax_cross_entropy(logits, y)
    grads = m.backward(dlogits, caches, need_dx=True)
    for name, p in params.items():
        assert relative_error(grads[name], numeric_gradient(loss, p)) < TOL, name
    x_small = x[:1]
    y_small = y[:1]
    logits, caches = m.forward(params, x_small)
    grads = m.backward(m.softmax_cross_entropy(logits, y_small)[1], caches, need_dx=True)
    loss_small = lambda: m.softmax_cross_entropy(m.forward(params, x_small)[0], y_small)[0]
    assert relative_error(grads["x"], numeric_gradient(loss_small, x_small)) < TOL


def test_whole_network_gradients_with_workspace_buffers(rng):
    """The reused buffers give the same gradients as fresh arrays, step after step."""
    _, params = m.init_params(rng, filters=3, hidden=6, dtype=np.float64)
    ws = {}
    for step in range(3):
        x = rng.standard_normal((4, 1, 28, 28))
        y = rng.integers(0, 10, 4)
        loss_ws, grads_ws, _ = m.loss_and_grads(params, x, y, ws)
        loss, grads, _ = m.loss_and_grads(params, x, y, None)
        assert loss_ws == loss
        for name in params:
            np.testing.assert_array_equal(grads_ws[name], grads[name])


def test_backward_twice_on_the_same_caches_gives_the_same_gradients(rng):
    """backward() writes the pool's gradient over the conv output it cached: nothing may read it later."""
    _, params = m.init_params(rng, filters=3, hidden=7, dtype=np.float64)
    x = rng.standard_normal((5, 1, 28, 28))
    logits, caches = m.forward(params, x, {})
    dlogits = rng.standard_normal(logits.shape)
    first = {k: v.copy() for k, v in m.backward(dlogits, caches, need_dx=True).items()}
    second = m.backward(dlogits, caches, need_dx=True)
    for name in first:
        np.testing.assert_array_equal(second[name], first[name])
