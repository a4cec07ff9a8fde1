"""Every layer of mnist_net: the fast version against a plain loop (tests/reference.py),
and every backward pass against centered finite differences in float64; then whole
networks, the layout agreement between a conv and its pool included."""
import math

import numpy as np
import pytest

import mnist_net as m
from reference import (batchnorm_naive, conv_naive, dense_naive, im2col_naive,
                       im2col_pool_order_naive, maxpool_backward_naive, maxpool_naive,
                       natural_to_pool_order, network_naive, numeric_gradient,
                       numeric_gradient_strided, pool_order_to_natural, relative_error, relu_naive,
                       softmax_cross_entropy_naive)

TOL = 1e-6          # relative error allowed between a backward pass and finite differences


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def with_params(layer, rng, dtype=np.float64):
    """A layer outside a network: random parameters of its shapes, zeroed gradient arrays."""
    for name, shape in layer.shapes.items():
        layer.params[name] = rng.standard_normal(shape).astype(dtype)
        layer.grads[name] = np.zeros(shape, dtype)
    return layer


def channel_major(a):
    """The same values as a (N, C, H, W), stored channel by channel, as a conv's output is."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def check_layer_gradients(layer, x, rng, reseed=None, dout_layout=lambda d: d):
    """Every parameter's and the input's gradient from backward against centered differences
    of the scalar loss sum(forward(x) * r), whose gradient w.r.t. the output is r.

    reseed: the layer draws random numbers (dropout): every forward gets the same ones.
    dout_layout: how the dout handed to backward is stored (its values stay r's)."""
    def forward():
        if reseed is not None:
            layer.rng = np.random.default_rng(reseed)
        return layer.forward(x, train=True)

    r = rng.standard_normal(forward().shape)
    loss = lambda: float(np.sum(forward() * r))
    forward()
    dx = np.array(layer.backward(dout_layout(r.copy()), need_dx=True))
    grads = {name: g.copy() for name, g in layer.grads.items()}
    assert dx.shape == x.shape
    for name, p in layer.params.items():
        error = relative_error(grads[name], numeric_gradient(loss, p))
        assert error < TOL, (name, error)
    numeric = numeric_gradient(loss, x) if x.flags.c_contiguous else numeric_gradient_strided(loss, x)
    error = relative_error(dx, numeric)
    assert error < TOL, ("input", error)
    return grads, dx


# =====================================================================================
# Convolution
# =====================================================================================
# (x shape (N, C, H, W), kernel, pad); the output is H + 2*pad - K + 1 on a side
CONV_CASES = [
    ((1, 1, 8, 8), 3, 0),           # 6x6, even
    ((1, 1, 28, 28), 3, 0),         # 26x26, the seed network's first layer
    ((5, 3, 9, 7), 3, 1),           # 9x7, odd
    ((5, 3, 10, 8), 5, 2),          # 10x8, even
    ((2, 1, 7, 7), 5, 0),           # 3x3, odd
    ((5, 1, 9, 11), 5, 2),          # 9x11, odd, not square
    ((2, 3, 6, 6), 3, 2),           # 8x8: more padding than the kernel's reach
    ((3, 2, 9, 9), 4, 0),           # 6x6 from an even kernel
    ((2, 2, 7, 7), 2, 1),           # 8x8 from an even kernel, padded
    ((3, 2, 6, 4), 1, 0),           # 1x1 kernel
    ((40, 2, 8, 6), 3, 0),          # 6x4, 40 images
    ((48, 1, 6, 6), 3, 0),          # 4x4, 48 images
]


def conv_output_even(shape, K, pad):
    return all((side + 2 * pad - K + 1) % 2 == 0 for side in shape[2:])


# both layouts; pool order only for even outputs (agree_on_pool_order keeps odd ones plain)
@pytest.mark.parametrize("shape, K, pad, pool_order",
                         [case + (False,) for case in CONV_CASES]
                         + [case + (True,) for case in CONV_CASES if conv_output_even(*case)])
def test_conv_forward_matches_loop_convolution(rng, shape, K, pad, pool_order):
    conv = with_params(m.Conv(shape[1], 4, K, pad), rng)
    conv.pool_order = pool_order
    x = rng.standard_normal(shape)
    out = conv.forward(x)
    expected = conv_naive(x, conv.params["weight"], conv.params["bias"], pad)
    if pool_order:
        assert out.shape == (4, 4, shape[0]) + tuple(s // 2 for s in expected.shape[2:])
        out = pool_order_to_natural(out)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channel by channel", "strided view"])
def test_conv_forward_reads_inputs_stored_in_any_order(rng, layout):
    """A conv after a batch norm or ReLU of a plain conv gets maps stored channel by channel."""
    x = rng.standard_normal((3, 2, 10, 12))
    x_in = channel_major(x) if layout == "channel by channel" else \
        np.repeat(x, 2, axis=3)[:, :, :, ::2]                   # same values, every other float
    for pad, pool_order in [(0, False), (1, False), (0, True), (1, True)]:
        conv = with_params(m.Conv(2, 3, 3, pad), rng)
        conv.pool_order = pool_order
        out = conv.forward(x_in)
        out = pool_order_to_natural(out) if pool_order else out
        np.testing.assert_allclose(out, conv_naive(x, conv.params["weight"], conv.params["bias"], pad),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool_order, pad", [(False, 0), (False, 2), (True, 0), (True, 1)])
def test_conv_reuses_its_workspace_and_gives_the_right_second_answer(rng, pool_order, pad):
    """The same layer called again with other inputs (and with a smaller last batch, then
    the full one again) answers for the new input: no stale padding, columns or output."""
    conv = with_params(m.Conv(2, 3, 3, pad), rng)
    conv.pool_order = pool_order
    w, b = conv.params["weight"], conv.params["bias"]
    first = conv.forward(rng.standard_normal((6, 2, 8, 8)) * 5)
    first_cols = conv.cols
    for step, n in enumerate((6, 2, 6)):
        x = rng.standard_normal((n, 2, 8, 8))
        out = conv.forward(x)
        if step == 0:                                       # the same buffers, refilled
            assert np.shares_memory(out, first) and np.shares_memory(conv.cols, first_cols)
        out = pool_order_to_natural(out) if pool_order else out
        np.testing.assert_allclose(out, conv_naive(x, w, b, pad), rtol=1e-12, atol=1e-12)


# --- im2col and col2im ------------------------------------------------------------------
# (xp shape (C, N, Hpad, Wpad), K); pool order needs Hpad - K + 1 and Wpad - K + 1 even
IM2COL_CASES = [((1, 2, 8, 8), 3), ((3, 2, 9, 7), 3), ((2, 3, 10, 8), 5), ((2, 1, 7, 9), 4),
                ((1, 3, 6, 6), 1)]


@pytest.mark.parametrize("xp_shape, K", IM2COL_CASES)
def test_im2col_matches_loop_and_ends_with_a_row_of_ones(rng, xp_shape, K):
    xp = rng.standard_normal(xp_shape)
    C = xp_shape[0]
    cols = m.im2col(xp, K)
    assert cols.shape[:2] == (1, C * K * K + 1)
    np.testing.assert_array_equal(cols[0, :-1], im2col_naive(xp, K))
    np.testing.assert_array_equal(cols[0, -1], 1.0)
    if conv_output_even((0, 0) + xp_shape[2:], K, 0):
        cols = m.im2col_pool_order(xp, K)
        assert cols.shape[:2] == (4, C * K * K + 1)
        np.testing.assert_array_equal(cols[:, :-1], im2col_pool_order_naive(xp, K))
        np.testing.assert_array_equal(cols[:, -1], 1.0)


@pytest.mark.parametrize("xp_shape, K, pool_order",
                         [case + (False,) for case in IM2COL_CASES]
                         + [case + (True,) for case in IM2COL_CASES if conv_output_even((0, 0) + case[0][2:], case[1], 0)])
def test_col2im_is_the_adjoint_of_im2col(rng, xp_shape, K, pool_order):
    """<im2col(x), c> == <x, col2im(c)> for random x and c: col2im adds each column back
    onto exactly the pixels im2col copied it from (the row of ones left out)."""
    im2col, col2im = (m.im2col_pool_order, m.col2im_pool_order) if pool_order else (m.im2col, m.col2im)
    C = xp_shape[0]
    for ws in (None, {}):
        xp = rng.standard_normal(xp_shape)
        cols = im2col(xp, K, ws)[:, :C * K * K]            # without the bias's row of ones
        c = rng.standard_normal(cols.shape)
        back = col2im(np.ascontiguousarray(c), xp_shape, K, ws)
        assert back.shape == xp_shape
        assert np.sum(cols * c) == pytest.approx(np.sum(xp * back), rel=1e-12)
        # twice with one workspace: col2im's buffer is cleared, not added to
        again = col2im(np.ascontiguousarray(c), xp_shape, K, ws).copy()
        np.testing.assert_allclose(again, col2im(np.ascontiguousarray(c), xp_shape, K, None), rtol=1e-14)


# --- conv gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("shape, K, pad, pool_order", [
    ((2, 1, 7, 6), 3, 0, False),
    ((2, 3, 6, 5), 5, 2, False),         # padded, 3 channels, odd output 6x5
    ((3, 2, 6, 4), 3, 1, True),          # padded, 2 channels, pool order
    ((2, 3, 8, 10), 5, 0, True),
    ((2, 2, 7, 7), 4, 1, True),          # even kernel, 6x6 output
    ((1, 2, 5, 5), 3, 1, True),          # one image
    ((40, 1, 4, 4), 3, 0, True),         # 40 maps of 2x2: the weight gradient in several chunks
    ((40, 1, 6, 5), 3, 1, False),        # 40 maps of 6x5: several chunks, plain layout
])
def test_conv_gradients(rng, shape, K, pad, pool_order):
    conv = with_params(m.Conv(shape[1], 3, K, pad), rng)
    conv.pool_order = pool_order
    x = rng.standard_normal(shape)
    grads, dx = check_layer_gradients(conv, x, rng)
    if shape[0] >= 40:
        N = shape[0]
        assert m.column_chunks(conv.cols, N, conv.cols.shape[2] // N).shape[1] > 1
    # need_dx=False: no input gradient, the same parameter gradients
    conv.forward(x)
    r = rng.standard_normal(conv.forward(x).shape)
    conv.backward(r, need_dx=True)
    with_dx = {name: g.copy() for name, g in conv.grads.items()}
    assert conv.backward(r, need_dx=False) is None
    for name in with_dx:
        np.testing.assert_allclose(conv.grads[name], with_dx[name], rtol=1e-14)


def test_conv_gradients_against_a_loop_over_output_pixels(rng):
    """dw, db and dx written out from out[n,f,i,j] = b[f] + sum w[f,c,ki,kj] xpad[n,c,i+ki,j+kj]."""
    x = rng.standard_normal((3, 2, 6, 6))
    pad, K = 1, 3
    for pool_order in (False, True):
        conv = with_params(m.Conv(2, 3, K, pad), rng)
        conv.pool_order = pool_order
        dout = rng.standard_normal((3, 3, 6, 6))                          # natural layout
        conv.forward(x)
        dx = conv.backward(natural_to_pool_order(dout) if pool_order else dout)
        w = conv.params["weight"]
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        dw, dxp = np.zeros_like(w), np.zeros_like(xp)
        for n, f, i, j in np.ndindex(dout.shape):
            dw[f] += dout[n, f, i, j] * xp[n, :, i:i + K, j:j + K]
            dxp[n, :, i:i + K, j:j + K] += dout[n, f, i, j] * w[f]
        np.testing.assert_allclose(conv.grads["weight"], dw, rtol=1e-12)
        np.testing.assert_allclose(conv.grads["bias"], dout.sum(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(dx, dxp[:, :, pad:-pad, pad:-pad], rtol=1e-12, atol=1e-14)


# =====================================================================================
# ReLU
# =====================================================================================
@pytest.mark.parametrize("layout", ["contiguous", "channel by channel", "pool order", "features"])
def test_relu_forward_backward_against_loops(rng, layout):
    x = rng.standard_normal((4, 3, 6, 6))
    x[0, 0, 0, :3] = 0.0                                        # at the kink: no gradient
    x = {"contiguous": x, "channel by channel": channel_major(x),
         "pool order": natural_to_pool_order(x), "features": x.reshape(4, -1)}[layout]
    relu = m.ReLU()
    out = relu.forward(x)
    np.testing.assert_array_equal(out, relu_naive(x))
    dout = rng.standard_normal(x.shape)
    for d in (dout, channel_major(dout) if dout.ndim == 4 else dout.T.copy().T):   # any dout layout
        dx = relu.backward(d)
        np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0.0))


def test_relu_gradient(rng):
    x = rng.standard_normal((4, 3, 5, 5))
    x[np.abs(x) < 0.01] = 0.5                                   # away from the kink at 0
    check_layer_gradients(m.ReLU(), x, rng)
    check_layer_gradients(m.ReLU(), channel_major(x), rng)


# =====================================================================================
# 2x2 max-pool
# =====================================================================================
def pool_forward_backward(a_natural, dout, pool_order):
    """Run the layer on a natural-layout map (given to it in pool order if asked) and
    return (out, da), da in the natural layout."""
    pool = m.MaxPool()
    pool.pool_order = pool_order
    out = pool.forward(natural_to_pool_order(a_natural) if pool_order else a_natural).copy()
    da = pool.backward(dout)
    return out, pool_order_to_natural(da) if pool_order else da.copy()


@pytest.mark.parametrize("shape, pool_order", [
    ((2, 3, 4, 4), False), ((2, 3, 5, 5), False), ((3, 2, 7, 6), False), ((1, 1, 28, 28), False),
    ((2, 3, 4, 4), True), ((3, 2, 6, 8), True),
])
def test_maxpool_matches_loops(rng, shape, pool_order):
    a = rng.standard_normal(shape)
    dout = rng.standard_normal((shape[0], shape[1], shape[2] // 2, shape[3] // 2))
    out, da = pool_forward_backward(a, dout, pool_order)
    np.testing.assert_array_equal(out, maxpool_naive(a))
    np.testing.assert_array_equal(da, maxpool_backward_naive(a, dout))


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


@pytest.mark.parametrize("pool_order", [False, True])
def test_maxpool_ties_go_to_the_first_position_only(pool_order):
    """Each window's gradient goes to the first maximum in reading order (top-left,
    top-right, bottom-left, bottom-right), and only there: the gradient is conserved."""
    a = every_tie_pattern()
    dout = np.arange(1.0, 31.0).reshape(1, 2, 1, 15)
    out, da = pool_forward_backward(a, dout, pool_order)
    np.testing.assert_array_equal(out, maxpool_naive(a))
    np.testing.assert_array_equal(out[0], [[[1.0] * 15], [[-1.0] * 15]])
    np.testing.assert_array_equal(da, maxpool_backward_naive(a, dout))
    assert da.sum() == dout.sum()                               # nothing multiplied, nothing lost
    assert np.count_nonzero(da) == dout.size                    # one position per window
    np.testing.assert_array_equal(da[0, :, 0, 0], dout[0, :, 0, 0])   # the blank window: top-left


@pytest.mark.parametrize("shape, pool_order", [((2, 3, 5, 5), False), ((2, 2, 7, 6), False),
                                               ((2, 3, 6, 6), True), ((1, 2, 3, 31), False)])
def test_maxpool_ties_in_maps_of_few_values(rng, shape, pool_order):
    """Maps of 0, 1 and 2 (ties of every kind, at random), a blank window in each, and the
    15 tie patterns with an extra row and column of larger values: odd sizes drop their
    last row or column, which then plays no part and gets no gradient."""
    a = rng.integers(0, 3, shape).astype(float)
    a[:, :, :2, :2] = 0.0
    if shape == (1, 2, 3, 31):
        a = every_tie_pattern(odd_edge=True)
    dout = rng.integers(1, 9, (shape[0], shape[1], shape[2] // 2, shape[3] // 2)).astype(float)
    out, da = pool_forward_backward(a, dout, pool_order)
    np.testing.assert_array_equal(out, maxpool_naive(a))
    np.testing.assert_array_equal(da, maxpool_backward_naive(a, dout))
    assert da.sum() == dout.sum()
    assert np.count_nonzero(da) == dout.size
    np.testing.assert_array_equal(da[:, :, 0, 0], dout[:, :, 0, 0])
    if shape[2] % 2:
        assert not da[:, :, -1].any()
    if shape[3] % 2:
        assert not da[:, :, :, -1].any()


def test_maxpool_blank_image_in_pool_order_gives_everything_to_top_left():
    a = natural_to_pool_order(np.zeros((2, 3, 6, 6)))
    dout = np.arange(1, 2 * 3 * 3 * 3 + 1, dtype=float).reshape(2, 3, 3, 3)
    pool = m.MaxPool()
    pool.pool_order = True
    pool.forward(a)
    da = pool.backward(dout)
    np.testing.assert_array_equal(da[0], dout.transpose(1, 0, 2, 3))   # block 0: top-left
    assert not da[1:].any()


@pytest.mark.parametrize("shape, pool_order", [((2, 3, 5, 5), False), ((2, 2, 7, 6), False),
                                               ((2, 3, 4, 6), True)])
def test_maxpool_gradient(rng, shape, pool_order):
    a = rng.standard_normal(shape)                              # random floats: no ties
    pool = m.MaxPool()
    pool.pool_order = pool_order
    check_layer_gradients(pool, natural_to_pool_order(a) if pool_order else a, rng)


# =====================================================================================
# Batch norm
# =====================================================================================
LAYOUTS = ["maps", "maps channel by channel", "pool order", "features"]


def bn_input(rng, layout, scale=3.0, shift=1.5):
    """(x as the layer gets it, the same values in the natural (N, C, H, W) or (N, D) layout)."""
    if layout == "features":
        x = rng.standard_normal((6, 4)) * scale + shift
        return x, x
    x = rng.standard_normal((3, 4, 4, 6)) * scale + shift
    if layout == "maps":
        return x, x
    if layout == "maps channel by channel":
        return channel_major(x), x
    return natural_to_pool_order(x), x


def to_natural(a, layout):
    return pool_order_to_natural(a) if layout == "pool order" else a


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_training_output_matches_loop(rng, layout):
    bn = with_params(m.BatchNorm(4, dtype=np.float64), rng)
    x, natural = bn_input(rng, layout)
    out = bn.forward(x, train=True)
    assert out.shape == x.shape
    expected, mean, var = batchnorm_naive(natural, bn.params["weight"], bn.params["bias"])
    np.testing.assert_allclose(to_natural(out, layout), expected, rtol=1e-10, atol=1e-12)
    # after one step from (0, 1): running = 0.1 * batch statistic (+ 0.9 * 1 for the variance),
    # the variance unbiased: M values per channel
    M = natural.size // 4
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], 0.9 + 0.1 * var * M / (M - 1), rtol=1e-12)
    assert bn.buffers["num_batches_tracked"] == 1


def place(values, layout):
    """values (C, 4): four numbers per channel -> an input holding them in the layout."""
    C = len(values)
    if layout == "features":
        return values.T.copy()                                       # (N=4, C)
    if layout in ("maps", "maps channel by channel"):
        x = values.T.reshape(2, 1, 2, C).transpose(0, 3, 1, 2)      # (N=2, C, 1, 2)
        return channel_major(x) if layout == "maps channel by channel" else np.ascontiguousarray(x)
    return np.ascontiguousarray(values.T.reshape(4, 1, 1, 1, C).transpose(0, 4, 1, 2, 3))   # (4, C, 1, 1, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_running_statistics_worked_out_by_hand(rng, layout):
    """Four values per channel, so M = 4 in every layout (N = 4 features, 2 maps of 1x2,
    or 4 pool blocks of 1 pixel).  Momentum 0.1 from running_mean 0, running_var 1:
      step 1, channel 0: 1, 2, 3, 6:  mean 3, sum of squares 4+1+0+9 = 14, unbiased var 14/3
              running_mean = 0.1*3 = 0.3;  running_var = 0.9*1 + 0.1*14/3 = 1.36666...
              channel 1: 5, 5, 5, 5:  mean 5, var 0
              running_mean = 0.5;  running_var = 0.9
      step 2, channel 0: 0, 0, 4, 4:  mean 2, sum of squares 16, unbiased var 16/3
              running_mean = 0.3 + 0.1*(2 - 0.3) = 0.47
              running_var = 1.36666... + 0.1*(16/3 - 1.36666...) = 1.23 + 0.53333... = 1.76333...
              channel 1: -1, 1, -1, 1: mean 0, sum of squares 4, unbiased var 4/3
              running_mean = 0.5 + 0.1*(0 - 0.5) = 0.45
              running_var = 0.9 + 0.1*(4/3 - 0.9) = 0.81 + 0.13333... = 0.94333...
    Normalising uses the biased variance: step 2's channel 0 outputs are (x - 2) / sqrt(4 + eps)."""
    bn = with_params(m.BatchNorm(2, dtype=np.float64), rng)
    bn.params["weight"][...] = 1.0
    bn.params["bias"][...] = 0.0
    bn.forward(place(np.array([[1.0, 2, 3, 6], [5, 5, 5, 5]]), layout), train=True)
    np.testing.assert_allclose(bn.buffers["running_mean"], [0.3, 0.5], rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], [0.9 + 1.4 / 3, 0.9], rtol=1e-12)
    out = bn.forward(place(np.array([[0.0, 0, 4, 4], [-1, 1, -1, 1]]), layout), train=True)
    np.testing.assert_allclose(bn.buffers["running_mean"], [0.47, 0.45], rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], [1.23 + 1.6 / 3, 0.81 + 0.4 / 3], rtol=1e-12)
    assert bn.buffers["num_batches_tracked"] == 2
    expected = place(np.array([[-2.0, -2, 2, 2], [-1, 1, -1, 1]]) / np.sqrt([[4 + 1e-5], [1 + 1e-5]]), layout)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    # evaluation: (x - running_mean) / sqrt(running_var + eps), the statistics left alone
    out = bn.forward(place(np.array([[9.0, 9, 9, 9], [9, 9, 9, 9]]), layout), train=False)
    expected = [(9 - 0.47) / math.sqrt(1.23 + 1.6 / 3 + 1e-5), (9 - 0.45) / math.sqrt(0.81 + 0.4 / 3 + 1e-5)]
    np.testing.assert_allclose(out, place(np.repeat(np.array(expected)[:, None], 4, axis=1), layout), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_mean"], [0.47, 0.45], rtol=1e-12)
    assert bn.buffers["num_batches_tracked"] == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_evaluation_uses_the_running_statistics(rng, layout):
    bn = with_params(m.BatchNorm(4, dtype=np.float64), rng)
    for _ in range(3):
        bn.forward(bn_input(rng, layout)[0], train=True)
    rm, rv = bn.buffers["running_mean"].copy(), bn.buffers["running_var"].copy()
    gamma, beta = bn.params["weight"], bn.params["bias"]
    x, natural = bn_input(rng, layout, scale=7.0, shift=-4.0)  # far from the running statistics
    out = to_natural(bn.forward(x, train=False), layout).copy()
    shape = (1, -1) + (1,) * (natural.ndim - 2)
    expected = gamma.reshape(shape) * (natural - rm.reshape(shape)) / np.sqrt(rv.reshape(shape) + 1e-5) \
        + beta.reshape(shape)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    # another batch does not change an image's output
    if layout != "pool order":                  # a pool-order block holds every image's pixels
        other = natural.copy()
        other[1:] = rng.standard_normal(other[1:].shape) * 100
        other_in = channel_major(other) if layout == "maps channel by channel" else other
        np.testing.assert_allclose(bn.forward(other_in, train=False)[0], out[0], rtol=1e-13)
        np.testing.assert_allclose(bn.forward(np.ascontiguousarray(natural[:1]), train=False)[0], out[0],
                                   rtol=1e-13)
    np.testing.assert_array_equal(bn.buffers["running_mean"], rm)
    np.testing.assert_array_equal(bn.buffers["running_var"], rv)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_gradients(rng, layout):
    bn = with_params(m.BatchNorm(4, dtype=np.float64), rng)
    check_layer_gradients(bn, bn_input(rng, layout)[0], rng)


@pytest.mark.parametrize("x_layout, dout_layout", [("maps", "channel by channel"),
                                                   ("maps channel by channel", "contiguous")])
def test_batchnorm_gradients_with_dout_stored_unlike_x(rng, x_layout, dout_layout):
    """After a plain conv the maps are stored channel by channel, the pool's gradient image by image."""
    bn = with_params(m.BatchNorm(4, dtype=np.float64), rng)
    layout = channel_major if dout_layout == "channel by channel" else np.ascontiguousarray
    check_layer_gradients(bn, bn_input(rng, x_layout)[0], rng, dout_layout=layout)


# =====================================================================================
# Dropout
# =====================================================================================
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p", [0.25, 0.5])
def test_dropout_training_zeroes_about_p_and_scales_the_rest(rng, p, dtype):
    x = (rng.random((100, 4, 5, 5)) + 0.5).astype(dtype)      # no zeros of its own
    drop = m.Dropout(p, np.random.default_rng(3))
    out = drop.forward(x, train=True)
    assert out.dtype == dtype and out.shape == x.shape
    dropped = out == 0
    assert abs(dropped.mean() - p) < 0.02                      # 10,000 values: 4 standard deviations
    kept = ~dropped
    np.testing.assert_array_equal(out[kept], x[kept] * dtype(1 / (1 - p)))   # exactly 1/(1-P)
    assert out.mean() == pytest.approx(x.mean(), rel=0.03)     # the expected output is the input


def test_dropout_evaluation_and_p0_pass_the_input_unchanged(rng):
    x = rng.standard_normal((5, 3, 4, 4))
    drop = m.Dropout(0.5, rng)
    assert drop.forward(x, train=False) is x
    dout = rng.standard_normal(x.shape)
    assert drop.backward(dout) is dout
    assert m.Dropout(0.0, rng).forward(x, train=True) is x


def test_dropout_mask_is_fresh_each_step_and_repeatable_from_the_seed(rng):
    x = np.ones((20, 30))
    a, b = m.Dropout(0.5, np.random.default_rng(7)), m.Dropout(0.5, np.random.default_rng(7))
    first, second = a.forward(x).copy(), a.forward(x).copy()
    assert (first != second).any()                             # a new mask every step
    np.testing.assert_array_equal(b.forward(x), first)         # the same seed, the same masks
    np.testing.assert_array_equal(b.forward(x), second)


def test_dropout_backward_uses_the_forward_mask(rng):
    x = rng.standard_normal((6, 50)) + 10                      # no zeros of its own
    drop = m.Dropout(0.3, rng)
    out = drop.forward(x, train=True)
    dout = rng.standard_normal(x.shape)
    dx = drop.backward(dout)
    np.testing.assert_array_equal(dx == 0, out == 0)
    np.testing.assert_array_equal(dx, np.where(out != 0, dout * (1 / (1 - 0.3)), 0.0))


@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (6, 8)])
def test_dropout_gradient_with_a_fixed_mask(rng, shape):
    check_layer_gradients(m.Dropout(0.4, rng), rng.standard_normal(shape), rng, reseed=3)


# =====================================================================================
# Dense, flatten, softmax cross-entropy
# =====================================================================================
def test_dense_matches_loop_and_gradients(rng):
    dense = with_params(m.Dense(7, 4), rng)
    x = rng.standard_normal((5, 7))
    np.testing.assert_allclose(dense.forward(x), dense_naive(x, dense.params["weight"], dense.params["bias"]),
                               rtol=1e-12)
    check_layer_gradients(dense, x, rng)
    assert dense.backward(rng.standard_normal((5, 4)), need_dx=False) is None


def test_flatten_is_channel_row_column_order_both_ways(rng):
    x = rng.standard_normal((3, 2, 4, 5))
    for stored in (x, channel_major(x)):
        flat = m.Flatten()
        out = flat.forward(stored)
        np.testing.assert_array_equal(out, np.array([image.ravel() for image in x]))   # PyTorch's order
        dout = rng.standard_normal(out.shape)
        np.testing.assert_array_equal(flat.backward(dout), dout.reshape(x.shape))


def test_softmax_cross_entropy_value_and_gradient(rng):
    z = rng.standard_normal((6, 10)) * 3
    y = rng.integers(0, 10, 6)
    loss, dz = m.softmax_cross_entropy(z, y)
    assert loss == pytest.approx(softmax_cross_entropy_naive(z, y), rel=1e-12)
    assert relative_error(dz, numeric_gradient(lambda: m.softmax_cross_entropy(z, y)[0], z)) < TOL
    # the mean over the batch: every row's gradient sums to 0 and carries 1/N
    np.testing.assert_allclose(dz.sum(axis=1), 0, atol=1e-15)
    np.testing.assert_allclose(dz[np.arange(6), y], (np.exp(m.log_softmax(z)) - 1)[np.arange(6), y] / 6)


def test_softmax_cross_entropy_is_stable_for_logits_in_the_thousands():
    z = np.array([[1000.0, 0.0, -1000.0] + [0.0] * 7,
                  [-1e4] * 9 + [1e4],
                  [3000.0, 3000.0] + [-3000.0] * 8])
    y = np.array([2, 9, 0])
    loss, dz = m.softmax_cross_entropy(z, y)
    assert math.isfinite(loss) and np.all(np.isfinite(dz))
    # -log p: 2000 for image 0, 0 for image 1, log 2 for image 2 (two equal top scores)
    assert loss == pytest.approx((2000 + 0 + math.log(2)) / 3, rel=1e-12)
    assert loss == pytest.approx(softmax_cross_entropy_naive(z, y), rel=1e-12)
    np.testing.assert_allclose(m.log_softmax(z)[2, :2], -math.log(2), rtol=1e-12)
    np.testing.assert_allclose(dz[2, :2], [(0.5 - 1) / 3, 0.5 / 3], rtol=1e-12)


# =====================================================================================
# The network: the agreement between a conv and its pool, and whole-network gradients
# =====================================================================================
def network(spec, seed=0, dtype=np.float64):
    net = m.Network(spec, np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for name, value in net.state.items():                      # batch norm off the identity
        if name.startswith("bn") and not name.endswith("num_batches_tracked"):
            value[...] = rng.uniform(0.5, 1.5, value.shape) if name.endswith(("weight", "running_var")) \
                else rng.standard_normal(value.shape) * 0.3
    return net


def kinds(layers):
    return [layer.kind for layer in layers]


# spec, expected run order, expected pool_order of each conv in order
AGREEMENT_CASES = [
    ("seed", "conv pool relu flatten fc relu fc", [True]),
    ("deep", "conv bn pool relu conv bn pool relu flatten fc relu fc", [True, True]),
    ("conv8 relu conv16 relu pool fc10", "conv relu conv pool relu flatten fc", [False, True]),
    # 25x25 output (odd): the plain layout and the written order
    ("conv4x4 relu pool fc10", "conv relu pool flatten fc", [False]),
    ("conv4x4p1 bn relu pool fc10", "conv bn relu pool flatten fc", [False]),
    # the pool order through batch norm and dropout; a ReLU not right before the pool stays
    ("conv3 relu bn pool fc10", "conv relu bn pool flatten fc", [True]),
    ("conv3p1 bn relu dropout0.5 pool conv4 relu pool fc10",
     "conv bn relu dropout pool conv pool relu flatten fc", [True, True]),
    # the second pool follows a pool, not a conv: plain, and its ReLU stays in front of it
    ("conv4 relu pool relu pool fc10", "conv pool relu relu pool flatten fc", [True]),
    ("conv3x5p2 relu pool conv2x2 relu pool fc16 bn relu fc10",
     "conv pool relu conv relu pool flatten fc bn relu fc", [True, False]),
]


@pytest.mark.parametrize("spec, run_order, pool_orders", AGREEMENT_CASES)
def test_network_agrees_with_the_plain_layer_by_layer_forward(spec, run_order, pool_orders):
    net = network(spec)
    assert " ".join(kinds(net.run_order)) == run_order
    convs = [layer for layer in net.layers if isinstance(layer, m.Conv)]
    assert [conv.pool_order for conv in convs] == pool_orders
    for i, layer in enumerate(net.layers):
        if isinstance(layer, m.MaxPool):
            # a pool runs in pool order exactly when the conv before it (through relu, bn,
            # dropout only) does
            j = i - 1
            while isinstance(net.layers[j], (m.ReLU, m.BatchNorm, m.Dropout)):
                j -= 1
            agreed = isinstance(net.layers[j], m.Conv) and net.layers[j].pool_order
            assert layer.pool_order == agreed
            # a ReLU right in front of a pool-order pool runs right after it
            if agreed and isinstance(net.layers[i - 1], m.ReLU):
                k = net.run_order.index(layer)
                assert net.run_order[k + 1] is net.layers[i - 1]
    assert sorted(map(id, net.run_order)) == sorted(map(id, net.layers))
    x = np.random.default_rng(7).standard_normal((3, 1, 28, 28))
    for _ in range(2):                                         # the second time on reused buffers
        logits = net.forward(x, train=False)
        np.testing.assert_allclose(logits, network_naive(net, x), rtol=1e-10, atol=1e-10)
    x = x[:2]                                                  # a smaller batch
    np.testing.assert_allclose(net.forward(x, train=False), network_naive(net, x), rtol=1e-10, atol=1e-10)
    if not any(isinstance(layer, m.Dropout) for layer in net.layers):
        np.testing.assert_allclose(net.forward(x, train=True), network_naive(net, x, train=True),
                                   rtol=1e-10, atol=1e-10)


def test_float32_network_matches_the_float64_one():
    x = np.random.default_rng(7).standard_normal((4, 1, 28, 28))
    for spec in ("seed", "deep"):
        logits64 = network(spec, dtype=np.float64).forward(x, train=True)
        logits32 = network(spec, dtype=np.float32).forward(x.astype(np.float32), train=True)
        assert logits32.dtype == np.float32
        np.testing.assert_allclose(logits32, logits64, rtol=1e-4, atol=1e-4)


def numeric_network_gradients(net, x, y, samples=None, rng=None, dropout_seed=None):
    """For every parameter (and the input): (analytic, numeric) gradients of the mean
    softmax cross-entropy in training mode, at all entries or at `samples` random ones."""
    def reseed():
        for layer in net.layers:
            if isinstance(layer, m.Dropout):
                layer.rng = np.random.default_rng(dropout_seed)

    def loss():
        reseed()
        return m.softmax_cross_entropy(net.forward(x, train=True), y)[0]

    reseed()
    logits = net.forward(x, train=True)
    dx = np.array(net.backward(m.softmax_cross_entropy(logits, y)[1], input_grad=True))
    analytic = {name: g.copy() for name, g in net.grads.items()}
    analytic["input"] = dx
    results = {}
    for name, p in list(net.params.items()) + [("input", x)]:
        picked = None if samples is None or p.size <= samples else rng.choice(p.size, samples, replace=False)
        numeric = numeric_gradient(loss, p, indices=picked)
        if picked is None:
            results[name] = analytic[name], numeric
        else:
            results[name] = analytic[name].reshape(-1)[picked], numeric.reshape(-1)[picked]
    return results


def test_small_seed_network_every_gradient_entry(rng):
    net = network("conv2 relu pool fc4 relu fc10")
    x, y = rng.standard_normal((2, 1, 28, 28)), np.array([3, 8])
    results = numeric_network_gradients(net, x, y)
    assert set(results) == {"conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias", "fc2.weight",
                            "fc2.bias", "input"}
    for name, (analytic, numeric) in results.items():
        assert relative_error(analytic, numeric) < TOL, name


@pytest.mark.parametrize("spec, dropout_seed", [
    ("deep", None),
    ("conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10", 5),   # dropout, bn on features
    ("conv4x4 bn relu pool fc10", None),                                   # odd output, plain layout
    ("conv3p1 relu dropout0.3 pool fc10", 2),                              # dropout on pool-order maps
])
def test_network_gradients_at_sampled_entries(rng, spec, dropout_seed):
    net = network(spec)
    x, y = rng.standard_normal((3, 1, 28, 28)), np.array([3, 8, 1])
    for name, (analytic, numeric) in numeric_network_gradients(net, x, y, 10, rng, dropout_seed).items():
        followed_by_bn = name.endswith(".bias") and not name.startswith("bn") and \
            isinstance(layer_after(net, name), m.BatchNorm)
        if followed_by_bn:
            # batch norm subtracts the channel's mean: the bias before it cannot change the loss
            assert np.abs(analytic).max() < 1e-12 and np.abs(numeric).max() < 1e-7, name
        else:
            assert relative_error(analytic, numeric) < TOL, name


def layer_after(net, param_name):
    """The layer after the one that holds the parameter (None after the last)."""
    i = next(i for i, layer in enumerate(net.layers)
             if any(p is net.params[param_name] for p in layer.params.values()))
    return net.layers[i + 1] if i + 1 < len(net.layers) else None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spec", ["seed", "deep", "conv4x4p1 bn relu pool fc16 relu fc10"])
def test_training_steps_on_reused_buffers_match_a_fresh_network(spec, dtype):
    """Steps in a row (a smaller last batch in between, the parameters updated after each)
    give the loss, logits and gradients a fresh network gives for the same parameters."""
    data = np.random.default_rng(3)
    net = network(spec, dtype=dtype)
    for n in (5, 3, 5):
        x = data.standard_normal((n, 1, 28, 28)).astype(dtype)
        y = data.integers(0, 10, n)
        loss, logits = m.loss_and_grads(net, x, y)
        fresh = network(spec, dtype=dtype)
        fresh.flat[...] = net.flat
        fresh_loss, fresh_logits = m.loss_and_grads(fresh, x, y)
        rtol = 1e-12 if dtype == np.float64 else 1e-5
        assert loss == pytest.approx(fresh_loss, rel=rtol)
        np.testing.assert_allclose(logits, fresh_logits, rtol=rtol, atol=rtol)
        scale = np.abs(fresh.grad).max()
        np.testing.assert_allclose(net.grad, fresh.grad, rtol=rtol, atol=rtol * scale)
        net.flat -= dtype(0.05) * net.grad
