"""Every layer of the chapter (mnist_net.py) against a plain loop (tests/reference.py), and
every backward pass against centred finite differences in float64; then whole networks.
The fast path (fast_layers.py) is checked against these layers in tests/test_fast_path.py."""
import math

import numpy as np
import pytest

import mnist_net as m
from reference import (batchnorm_backward_naive, batchnorm_eval_naive, batchnorm_naive, col2im_naive,
                       conv_backward_naive, every_tie_pattern, conv_naive, dense_naive, dropout_naive, flatten_naive,
                       im2col_naive, maxpool_backward_naive, maxpool_naive, network_naive,
                       numeric_gradient, relative_error, relu_naive, softmax_cross_entropy_naive)

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


def every_other(a):
    """The same values as a, as a strided view reading every other float of a bigger array."""
    return np.repeat(a, 2, axis=-1)[..., ::2]


def check_layer_gradients(layer, x, rng, reseed=None, train=True):
    """Every parameter's and the input's gradient from backward against centred differences
    of the scalar loss sum(forward(x) * r), whose gradient w.r.t. the output is r.

    reseed: the layer draws random numbers (dropout): every forward gets the same ones.
    train=False: the backward of an evaluation forward (batch norm on running statistics)."""
    def forward():
        if reseed is not None:
            layer.rng = np.random.default_rng(reseed)
        return layer.forward(x, train=train)

    r = rng.standard_normal(forward().shape)
    loss = lambda: float(np.sum(forward() * r))
    forward()
    dx = np.array(layer.backward(r.copy(), need_dx=True))
    grads = {name: g.copy() for name, g in layer.grads.items()}
    assert dx.shape == x.shape
    for name, p in layer.params.items():
        error = relative_error(grads[name], numeric_gradient(loss, p))
        assert error < TOL, (name, error)
    error = relative_error(dx, numeric_gradient(loss, x))
    assert error < TOL, ("input", error)
    return grads, dx


# =====================================================================================
# Convolution
# =====================================================================================
# (x shape (N, C, H, W), kernel, pad); the output is H + 2*pad - K + 1 on a side
CONV_CASES = [
    ((1, 1, 8, 8), 3, 0),           # 6x6
    ((1, 1, 28, 28), 3, 0),         # 26x26, the seed network's first layer
    ((5, 3, 9, 7), 3, 1),           # 9x7, odd, padded, 3 channels
    ((5, 3, 10, 8), 5, 2),          # 10x8, 5x5 kernel
    ((2, 1, 7, 7), 5, 0),           # 3x3, odd
    ((5, 1, 9, 11), 5, 2),          # 9x11, odd, not square
    ((2, 3, 6, 6), 3, 2),           # 8x8: more padding than the kernel's reach
    ((3, 2, 9, 9), 4, 0),           # 6x6 from an even kernel
    ((2, 2, 7, 7), 2, 1),           # 8x8 from an even kernel, padded
    ((3, 2, 6, 4), 1, 0),           # 1x1 kernel
    ((2, 2, 3, 3), 3, 0),           # 1x1 output: the kernel covers the whole map
]


@pytest.mark.parametrize("shape, K, pad", CONV_CASES)
def test_conv_forward_matches_loop_convolution(rng, shape, K, pad):
    conv = with_params(m.Conv(shape[1], 4, K, pad), rng)
    x = rng.standard_normal(shape)
    out = conv.forward(x)
    N, _, H, W = shape
    assert out.shape == (N, 4, H + 2 * pad - K + 1, W + 2 * pad - K + 1)
    np.testing.assert_allclose(out, conv_naive(x, conv.params["weight"], conv.params["bias"], pad),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channel by channel", "strided view"])
def test_conv_forward_reads_inputs_stored_in_any_order(rng, layout):
    """A conv after a ReLU or batch norm of a conv gets maps stored channel by channel."""
    x = rng.standard_normal((3, 2, 10, 12))
    x_in = channel_major(x) if layout == "channel by channel" else every_other(x)
    for pad in (0, 1):
        conv = with_params(m.Conv(2, 3, 3, pad), rng)
        np.testing.assert_allclose(conv.forward(x_in), conv_naive(x, conv.params["weight"],
                                                                  conv.params["bias"], pad),
                                   rtol=1e-12, atol=1e-12)


# (xpad shape (N, C, Hp, Wp), K)
IM2COL_CASES = [((2, 1, 8, 8), 3), ((2, 3, 9, 7), 3), ((3, 2, 10, 8), 5), ((1, 2, 7, 9), 4),
                ((3, 1, 6, 6), 1)]


@pytest.mark.parametrize("xpad_shape, K", IM2COL_CASES)
def test_im2col_and_col2im_match_loops(rng, xpad_shape, K):
    xpad = rng.standard_normal(xpad_shape)
    cols = m.im2col(xpad, K)
    np.testing.assert_array_equal(cols, im2col_naive(xpad, K))
    np.testing.assert_array_equal(m.im2col(channel_major(xpad), K), cols)   # any memory order
    dcols = rng.standard_normal(cols.shape)
    back = m.col2im(dcols, xpad_shape, K)
    assert back.shape == xpad_shape
    np.testing.assert_allclose(back, col2im_naive(dcols, xpad_shape, K), rtol=1e-12, atol=1e-14)
    # the adjoint: <im2col(x), c> == <x, col2im(c)>, each column added back where it came from
    assert np.sum(cols * dcols) == pytest.approx(np.sum(xpad * back), rel=1e-12)


@pytest.mark.parametrize("shape, K, pad", [((2, 1, 7, 6), 3, 0), ((3, 2, 6, 6), 3, 1),
                                           ((2, 3, 6, 5), 5, 2), ((2, 2, 7, 7), 4, 1)])
def test_conv_backward_matches_a_loop_over_output_pixels(rng, shape, K, pad):
    conv = with_params(m.Conv(shape[1], 3, K, pad), rng)
    x = rng.standard_normal(shape)
    out = conv.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = conv.backward(dout)
    dx_loop, dw_loop, db_loop = conv_backward_naive(x, conv.params["weight"], dout, pad)
    np.testing.assert_allclose(conv.grads["weight"], dw_loop, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(conv.grads["bias"], db_loop, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, dx_loop, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape, K, pad", [
    ((2, 1, 7, 6), 3, 0),                # plain
    ((3, 2, 6, 4), 3, 1),                # padded, 2 channels
    ((2, 3, 6, 5), 5, 2),                # 5x5 kernel, padded, 3 channels, odd output 6x5
    ((2, 2, 7, 7), 4, 1),                # even kernel
    ((1, 4, 5, 5), 3, 0),                # one image, 4 channels
])
def test_conv_gradients(rng, shape, K, pad):
    conv = with_params(m.Conv(shape[1], 3, K, pad), rng)
    x = rng.standard_normal(shape)
    check_layer_gradients(conv, x, rng)
    # need_dx=False: no input gradient, the same parameter gradients
    r = rng.standard_normal(conv.forward(x).shape)
    conv.backward(r, need_dx=True)
    with_dx = {name: g.copy() for name, g in conv.grads.items()}
    assert conv.backward(r, need_dx=False) is None
    for name in with_dx:
        np.testing.assert_array_equal(conv.grads[name], with_dx[name])


# =====================================================================================
# ReLU
# =====================================================================================
@pytest.mark.parametrize("layout", ["contiguous", "channel by channel", "strided view", "features"])
def test_relu_forward_backward_against_loops(rng, layout):
    x = rng.standard_normal((4, 3, 6, 6))
    x[0, 0, 0, :3] = 0.0                                        # at the kink: no gradient
    x = {"contiguous": x, "channel by channel": channel_major(x), "strided view": every_other(x),
         "features": x.reshape(4, -1)}[layout]
    relu = m.ReLU()
    np.testing.assert_array_equal(relu.forward(x), relu_naive(x))
    dout = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(relu.backward(dout), np.where(relu_naive(x) > 0, dout, 0.0))


def test_relu_gradient(rng):
    x = rng.standard_normal((4, 3, 5, 5))
    x[np.abs(x) < 0.01] = 0.5                                   # away from the kink at 0
    check_layer_gradients(m.ReLU(), x, rng)
    check_layer_gradients(m.ReLU(), x.reshape(4, -1), rng)


# =====================================================================================
# 2x2 max-pool
# =====================================================================================
def test_quarters_are_the_four_positions_of_every_window_as_views(rng):
    a = rng.standard_normal((2, 3, 5, 7))                        # odd: the last row and column dropped
    tl, tr, bl, br = m.quarters(a)
    for q, (di, dj) in zip((tl, tr, bl, br), [(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert q.shape == (2, 3, 2, 3) and np.shares_memory(q, a)
        for p, s in np.ndindex(2, 3):
            np.testing.assert_array_equal(q[:, :, p, s], a[:, :, 2 * p + di, 2 * s + dj])


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 5, 5), (3, 2, 7, 6), (1, 1, 28, 28), (2, 1, 2, 9)])
def test_maxpool_matches_loops(rng, shape):
    a = rng.standard_normal(shape)
    pool = m.MaxPool()
    out = pool.forward(a)
    np.testing.assert_array_equal(out, maxpool_naive(a))
    dout = rng.standard_normal(out.shape)
    np.testing.assert_array_equal(pool.backward(dout), maxpool_backward_naive(a, dout))


def test_maxpool_ties_go_to_the_first_position_only():
    """Each window's gradient goes to the first maximum in reading order (top-left,
    top-right, bottom-left, bottom-right), and only there: the gradient is conserved."""
    a = every_tie_pattern()
    dout = np.arange(1.0, 31.0).reshape(1, 2, 1, 15)
    pool = m.MaxPool()
    out = pool.forward(a)
    da = pool.backward(dout)
    np.testing.assert_array_equal(out, maxpool_naive(a))
    np.testing.assert_array_equal(out[0], [[[1.0] * 15], [[-1.0] * 15]])
    np.testing.assert_array_equal(da, maxpool_backward_naive(a, dout))
    assert da.sum() == dout.sum()                               # nothing multiplied, nothing lost
    assert np.count_nonzero(da) == dout.size                    # one position per window
    np.testing.assert_array_equal(da[0, :, 0, 0], dout[0, :, 0, 0])   # the blank window: top-left


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 2, 7, 6), (2, 3, 6, 6), (1, 2, 3, 31)])
def test_maxpool_ties_in_maps_of_few_values(rng, shape):
    """Maps of 0, 1 and 2 (ties of every kind, at random), a blank window in each, and the
    15 tie patterns with an extra row and column of larger values: odd sizes drop their
    last row or column, which then plays no part and gets no gradient."""
    a = rng.integers(0, 3, shape).astype(float)
    a[:, :, :2, :2] = 0.0
    if shape == (1, 2, 3, 31):
        a = every_tie_pattern(odd_edge=True)
    dout = rng.integers(1, 9, (shape[0], shape[1], shape[2] // 2, shape[3] // 2)).astype(float)
    pool = m.MaxPool()
    out = pool.forward(a)
    da = pool.backward(dout)
    np.testing.assert_array_equal(out, maxpool_naive(a))
    np.testing.assert_array_equal(da, maxpool_backward_naive(a, dout))
    assert da.sum() == dout.sum()
    assert np.count_nonzero(da) == dout.size
    np.testing.assert_array_equal(da[:, :, 0, 0], dout[:, :, 0, 0])
    if shape[2] % 2:
        assert not da[:, :, -1].any()
    if shape[3] % 2:
        assert not da[:, :, :, -1].any()


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 5, 5), (2, 2, 7, 6)])
def test_maxpool_gradient(rng, shape):
    check_layer_gradients(m.MaxPool(), rng.standard_normal(shape), rng)     # random floats: no ties


def test_maxpool_reads_maps_stored_channel_by_channel(rng):
    a = rng.standard_normal((3, 2, 6, 7))
    dout = rng.standard_normal((3, 2, 3, 3))
    for stored in (channel_major(a), every_other(a)):
        pool = m.MaxPool()
        np.testing.assert_array_equal(pool.forward(stored), maxpool_naive(a))
        np.testing.assert_array_equal(pool.backward(dout), maxpool_backward_naive(a, dout))


# =====================================================================================
# Batch norm
# =====================================================================================
LAYOUTS = ["maps", "maps channel by channel", "features"]


def bn_input(rng, layout, scale=3.0, shift=1.5):
    """(x as the layer gets it, the same values stored plainly)."""
    if layout == "features":
        x = rng.standard_normal((6, 4)) * scale + shift
        return x, x
    x = rng.standard_normal((3, 4, 4, 6)) * scale + shift
    return (channel_major(x) if layout == "maps channel by channel" else x), x


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_training_output_matches_loop(rng, layout):
    bn = with_params(m.BatchNorm(4, dtype=np.float64), rng)
    x, natural = bn_input(rng, layout)
    out = bn.forward(x, train=True)
    assert out.shape == x.shape
    expected, mean, var = batchnorm_naive(natural, bn.params["weight"], bn.params["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
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
    x = np.ascontiguousarray(values.T.reshape(2, 1, 2, C).transpose(0, 3, 1, 2))   # (N=2, C, 1, 2)
    return channel_major(x) if layout == "maps channel by channel" else x


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_running_statistics_worked_out_by_hand(rng, layout):
    """Four values per channel, so M = 4 in every layout (N = 4 features, or 2 maps of 1x2).
    Momentum 0.1 from running_mean 0, running_var 1:
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
    x, natural = bn_input(rng, layout, scale=7.0, shift=-4.0)  # far from the running statistics
    out = bn.forward(x, train=False).copy()
    np.testing.assert_allclose(out, batchnorm_eval_naive(natural, bn.params["weight"], bn.params["bias"], rm, rv),
                               rtol=1e-12, atol=1e-12)
    # another batch does not change an image's output, nor does an image alone
    other = natural.copy()
    other[1:] = rng.standard_normal(other[1:].shape) * 100
    np.testing.assert_allclose(bn.forward(other, train=False)[0], out[0], rtol=1e-13)
    np.testing.assert_allclose(bn.forward(natural[:1], train=False)[0], out[0], rtol=1e-13)
    np.testing.assert_array_equal(bn.buffers["running_mean"], rm)
    np.testing.assert_array_equal(bn.buffers["running_var"], rv)
    assert bn.buffers["num_batches_tracked"] == 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_gradients(rng, layout):
    bn = with_params(m.BatchNorm(4, dtype=np.float64), rng)
    x, natural = bn_input(rng, layout)
    grads, dx = check_layer_gradients(bn, x, rng)
    # and against the staged chain rule, through mu and var one step at a time
    dout = rng.standard_normal(x.shape)
    bn.forward(x, train=True)
    dx = bn.backward(dout)
    dx_loop, dgamma, dbeta = batchnorm_backward_naive(natural, bn.params["weight"], dout)
    np.testing.assert_allclose(dx, dx_loop, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.grads["weight"], dgamma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.grads["bias"], dbeta, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_gradients_in_evaluation(rng, layout):
    """After an evaluation forward the running statistics are constants: dx = gamma * dout /
    sqrt(running_var + eps), with no terms through the batch's mean and variance."""
    bn = with_params(m.BatchNorm(4, dtype=np.float64), rng)
    bn.buffers["running_mean"][...] = rng.standard_normal(4)
    bn.buffers["running_var"][...] = rng.uniform(0.5, 2, 4)
    x, natural = bn_input(rng, layout)
    check_layer_gradients(bn, x, rng, train=False)
    dout = rng.standard_normal(x.shape)
    bn.forward(x, train=False)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    expected = (bn.params["weight"] / np.sqrt(bn.buffers["running_var"] + 1e-5)).reshape(shape) * dout
    np.testing.assert_allclose(bn.backward(dout), expected, rtol=1e-12)


def test_batchnorm_keeps_float32_in_float32(rng):
    bn = m.BatchNorm(3)
    bn.params = {"weight": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}
    bn.grads = {"weight": np.zeros(3, np.float32), "bias": np.zeros(3, np.float32)}
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    for train in (True, False):
        out = bn.forward(x, train=train)
        assert out.dtype == np.float32 and bn.backward(np.ones_like(out)).dtype == np.float32


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


@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (6, 7)])
def test_dropout_matches_a_loop_with_the_same_mask(rng, shape):
    """The mask is one uniform draw per value from the layer's generator: kept where >= P."""
    x = rng.standard_normal(shape)
    drop = m.Dropout(0.3, np.random.default_rng(11))
    keep = np.random.default_rng(11).random(shape, dtype=np.float32) >= 0.3
    out = drop.forward(x, train=True)
    np.testing.assert_allclose(out, dropout_naive(x, keep, 0.3), rtol=1e-15)
    dout = rng.standard_normal(shape)
    np.testing.assert_allclose(drop.backward(dout), dropout_naive(dout, keep, 0.3), rtol=1e-15)


def test_dropout_evaluation_and_p0_pass_the_input_unchanged(rng):
    x = rng.standard_normal((5, 3, 4, 4))
    drop = m.Dropout(0.5, rng)
    np.testing.assert_array_equal(drop.forward(x, train=False), x)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(drop.backward(dout), dout)
    np.testing.assert_array_equal(m.Dropout(0.0, rng).forward(x, train=True), x)


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
    dout = rng.standard_normal((5, 4))
    dense.forward(x)
    dx = dense.backward(dout)
    np.testing.assert_allclose(dense.grads["weight"], sum(np.outer(dout[n], x[n]) for n in range(5)), rtol=1e-12)
    np.testing.assert_allclose(dense.grads["bias"], dout.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dx, dense_naive(dout, dense.params["weight"].T, np.zeros(7)), rtol=1e-12)
    assert dense.backward(dout, need_dx=False) is None


def test_flatten_is_channel_row_column_order_both_ways(rng):
    x = rng.standard_normal((3, 2, 4, 5))
    for stored in (x, channel_major(x), every_other(x)):
        flat = m.Flatten()
        out = flat.forward(stored)
        np.testing.assert_array_equal(out, flatten_naive(x))     # PyTorch's order
        dout = rng.standard_normal(out.shape)
        dx = flat.backward(dout)
        assert dx.shape == x.shape
        np.testing.assert_array_equal(flatten_naive(dx), dout)
    check_layer_gradients(m.Flatten(), x, rng)


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
# What a forward returns belongs to the caller
# =====================================================================================
def chapter_layers(rng):
    """One of each layer kind, standalone, with the input it takes."""
    bn_maps = with_params(m.BatchNorm(2, dtype=np.float64), rng)
    return [(with_params(m.Conv(2, 3, 3, 1), rng), (3, 2, 6, 6)), (m.ReLU(), (3, 2, 6, 6)),
            (m.MaxPool(), (3, 2, 6, 6)), (bn_maps, (3, 2, 6, 6)),
            (with_params(m.BatchNorm(5, dtype=np.float64), rng), (4, 5)),
            (m.Dropout(0.5, np.random.default_rng(0)), (3, 2, 6, 6)), (m.Flatten(), (3, 2, 6, 6)),
            (with_params(m.Dense(5, 4), rng), (4, 5))]


@pytest.mark.parametrize("index", range(8))
def test_later_calls_do_not_change_what_a_layer_returned(rng, index):
    layer, shape = chapter_layers(rng)[index]
    for train in (True, False):
        x = rng.standard_normal(shape)
        out = layer.forward(x, train=train)
        kept_out = out.copy()
        dx = layer.backward(rng.standard_normal(out.shape))
        kept_dx = dx.copy()
        layer.forward(rng.standard_normal(shape) * 5, train=train)   # another step
        layer.backward(rng.standard_normal(out.shape) * 5)
        np.testing.assert_array_equal(out, kept_out)
        np.testing.assert_array_equal(dx, kept_dx)


# =====================================================================================
# Whole networks
# =====================================================================================
def network(spec, seed=0, dtype=np.float64):
    net = m.Network(spec, np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for name, value in net.state.items():                      # batch norm off the identity
        if name.startswith("bn") and not name.endswith("num_batches_tracked"):
            value[...] = rng.uniform(0.5, 1.5, value.shape) if name.endswith(("weight", "running_var")) \
                else rng.standard_normal(value.shape) * 0.3
    return net


NETWORK_SPECS = [
    "seed", "deep",
    "conv8 relu conv16 relu pool fc10",
    "conv4x4 relu pool fc10",                                  # 25x25: an odd map into the pool
    "conv4x4p1 bn relu pool fc10",
    "conv3 relu bn pool fc10",
    "conv3p1 bn relu dropout0.5 pool conv4 relu pool fc10",
    "conv4 relu pool relu pool fc10",
    "conv3x5p2 relu pool conv2x2 relu pool fc16 bn relu fc10",
    "conv3 pool relu conv5 bn pool fc10",
    "fc12 relu fc10",                                          # no map at all
]


@pytest.mark.parametrize("spec", NETWORK_SPECS)
def test_network_forward_matches_the_loop_layers(spec):
    net = network(spec)
    x = np.random.default_rng(7).standard_normal((3, 1, 28, 28))
    logits = net.forward(x, train=False)
    assert logits.shape == (3, 10)
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


def layer_after(net, param_name):
    """The layer after the one that holds the parameter (None after the last)."""
    i = next(i for i, layer in enumerate(net.layers)
             if any(p is net.params[param_name] for p in layer.params.values()))
    return net.layers[i + 1] if i + 1 < len(net.layers) else None


@pytest.mark.parametrize("spec, dropout_seed", [
    ("deep", None),
    ("conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10", 5),   # dropout, bn on features
    ("conv4x4 bn relu pool fc10", None),                                   # odd map into the pool
    ("conv3p1 relu dropout0.3 pool fc10", 2),                              # dropout on maps
    ("conv5x5p2 bn relu pool conv7 relu pool fc10", None),
    ("conv3 pool relu conv5 bn pool fc10", None),
])
def test_network_gradients_at_sampled_entries(rng, spec, dropout_seed):
    net = network(spec)
    x, y = rng.standard_normal((3, 1, 28, 28)), np.array([3, 8, 1])
    zero_checked = 0
    for name, (analytic, numeric) in numeric_network_gradients(net, x, y, 10, rng, dropout_seed).items():
        followed_by_bn = name.endswith(".bias") and not name.startswith("bn") and \
            isinstance(layer_after(net, name), m.BatchNorm)
        if followed_by_bn:
            # batch norm subtracts the channel's mean: the bias before it cannot change the loss
            assert np.abs(analytic).max() < 1e-12 and np.abs(numeric).max() < 1e-7, name
            zero_checked += 1
        else:
            assert relative_error(analytic, numeric) < TOL, name
    assert zero_checked == sum(isinstance(b, m.BatchNorm) and a.shapes and a.kind != "bn"
                               for a, b in zip(net.layers, net.layers[1:]))


@pytest.mark.parametrize("spec", ["seed", "deep", "conv3 relu conv4x5p1 bn relu pool fc8 bn relu fc10"])
def test_input_grad_false_gives_the_same_parameter_gradients(spec):
    """Without input_grad, backward stops below the first layer that learns: same gradients."""
    net = network(spec)
    x, y = np.random.default_rng(3).standard_normal((4, 1, 28, 28)), np.array([1, 2, 3, 4])
    m.loss_and_grads(net, x, y)
    without = net.grad.copy()
    logits = net.forward(x, train=True)
    dx = net.backward(m.softmax_cross_entropy(logits, y)[1], input_grad=True)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(net.grad, without)
    assert net.backward(m.softmax_cross_entropy(logits, y)[1]) is None


@pytest.mark.parametrize("spec", ["seed", "deep", "conv4x4p1 bn relu pool fc16 relu fc10"])
def test_training_steps_match_a_fresh_network(spec):
    """Steps in a row (a smaller last batch in between, the parameters updated after each)
    give the loss, logits and gradients a fresh network gives for the same parameters:
    nothing of one step leaks into the next but the parameters and running statistics."""
    data = np.random.default_rng(3)
    net = network(spec)
    for n in (5, 3, 5):
        x = data.standard_normal((n, 1, 28, 28))
        y = data.integers(0, 10, n)
        loss, logits = m.loss_and_grads(net, x, y)
        fresh = network(spec)
        fresh.flat[...] = net.flat
        fresh_loss, fresh_logits = m.loss_and_grads(fresh, x, y)
        assert loss == pytest.approx(fresh_loss, rel=1e-12)
        np.testing.assert_allclose(logits, fresh_logits, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(net.grad, fresh.grad, rtol=1e-12, atol=1e-12 * np.abs(fresh.grad).max())
        net.flat -= 0.05 * net.grad
