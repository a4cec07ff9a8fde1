"""The fast path (fast_layers.py) against the chapter (mnist_net.py): every fast layer gives
its chapter layer's output and every gradient (the input's and the parameters') in float64,
on every layout and option it handles; the spans that pool order joins (conv, ReLU or batch
norm, pool) together; whole networks, their training and the optimizers; and the start-up
check differs_from_chapter, both ways.  The chapter itself is checked against loops and
finite differences in tests/test_layers.py."""
import argparse

import numpy as np
import pytest

import fast_layers as fl
import mnist_net as m
from reference import (assert_gradients_equal, every_tie_pattern, im2col_naive, im2col_pool_order_naive, natural_to_pool_order,
                       pool_order_to_natural)

RTOL = 1e-12        # one layer, float64: only the order of the sums differs
NET_RTOL = 1e-9     # a whole network, float64


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def twins(kind, *args, rng, **kwargs):
    """(chapter layer, fast layer) of one kind, outside a network, with the same float64
    parameters and buffers and their own zeroed gradient arrays."""
    chapter, fast = m.LAYER_TYPES[kind](*args, **kwargs), fl.FAST_TYPES[kind](*args, **kwargs)
    assert type(fast) is not type(chapter) and isinstance(fast, type(chapter))
    for name, shape in chapter.shapes.items():
        value = rng.standard_normal(shape)
        for layer in (chapter, fast):
            layer.params[name] = value.copy()
            layer.grads[name] = np.zeros(shape)
    for name, value in chapter.buffers.items():
        start = rng.uniform(0.5, 1.5, value.shape) if value.dtype.kind == "f" else value
        for layer in (chapter, fast):
            layer.buffers[name] = np.array(start)
    return chapter, fast


def channel_major(a):
    """The same values as a (N, C, H, W), stored channel by channel, as a conv's output is."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def every_other(a):
    """The same values as a, as a strided view reading every other float of a bigger array."""
    return np.repeat(a, 2, axis=-1)[..., ::2]


def assert_same(fast, chapter, what, rtol=RTOL):
    assert fast.shape == chapter.shape, what
    scale = max(np.abs(chapter).max(initial=0.0), 1.0)
    np.testing.assert_allclose(fast, chapter, rtol=rtol, atol=rtol * scale, err_msg=what)


def forward_backward(layer, x, dout, train=True):
    """(output, dx, parameter gradients), each copied at once: a fast layer's output is
    its work array, valid until its next call."""
    out = np.array(layer.forward(x, train=train))
    dx = layer.backward(dout, need_dx=True)
    return out, np.array(dx), {name: g.copy() for name, g in layer.grads.items()}


def compare(chapter, fast, x, train=True, rng=None, x_fast=None, out_to_natural=None,
            dout_to_fast=None, dx_to_natural=None):
    """One forward and backward of both layers on the same values: the chapter's on x, the
    fast one's on x_fast (x by default: x in pool order, say), with the layout conversions
    of the fast side given; everything compared in the chapter's layout."""
    out_c = np.array(chapter.forward(x, train=train))
    dout = rng.standard_normal(out_c.shape)
    dx_c = np.array(chapter.backward(dout.copy(), need_dx=True))
    grads_c = {name: g.copy() for name, g in chapter.grads.items()}
    out_f, dx_f, grads_f = forward_backward(fast, x if x_fast is None else x_fast,
                                            dout_to_fast(dout) if dout_to_fast else dout.copy(), train)
    assert_same(out_to_natural(out_f) if out_to_natural else out_f, out_c, "output")
    assert_same(dx_to_natural(dx_f) if dx_to_natural else dx_f, dx_c, "input gradient")
    assert set(grads_f) == set(grads_c)
    for name in grads_c:
        assert_same(grads_f[name], grads_c[name], f"{name} gradient")
    for name in chapter.buffers:
        assert_same(np.asarray(fast.buffers[name]), np.asarray(chapter.buffers[name]), name)
    return out_c, dx_c


# =====================================================================================
# Convolution
# =====================================================================================
# (x shape (N, C, H, W), kernel, pad); the output is H + 2*pad - K + 1 on a side
CONV_CASES = [
    ((1, 1, 8, 8), 3, 0),           # 6x6, even
    ((2, 1, 28, 28), 3, 0),         # 26x26, the seed network's first layer
    ((5, 3, 9, 7), 3, 1),           # 9x7, odd, 3 channels
    ((5, 3, 10, 8), 5, 2),          # 10x8, 5x5 kernel, padded
    ((2, 1, 7, 7), 5, 0),           # 3x3, odd
    ((5, 1, 9, 11), 5, 2),          # 9x11, odd, not square
    ((2, 3, 6, 6), 3, 2),           # 8x8: more padding than the kernel's reach
    ((3, 2, 9, 9), 4, 0),           # 6x6 from an even kernel
    ((2, 2, 7, 7), 2, 1),           # 8x8 from an even kernel, padded
    ((3, 2, 6, 4), 1, 0),           # 1x1 kernel
    ((40, 2, 8, 6), 3, 0),          # 6x4, 40 images: the weight gradient in several chunks
    ((48, 1, 6, 6), 3, 0),          # 4x4, 48 images
    ((40, 1, 6, 5), 3, 1),          # 6x5, 40 images, odd
]


def conv_output_even(shape, K, pad):
    return all((side + 2 * pad - K + 1) % 2 == 0 for side in shape[2:])


# pool order only for even outputs (agree_on_pool_order keeps odd ones plain)
@pytest.mark.parametrize("shape, K, pad, pool_order",
                         [case + (False,) for case in CONV_CASES]
                         + [case + (True,) for case in CONV_CASES if conv_output_even(*case)])
def test_fast_conv_equals_the_chapter_conv(rng, shape, K, pad, pool_order):
    chapter, fast = twins("conv", shape[1], 4, K, pad, rng=rng)
    fast.pool_order = pool_order
    x = rng.standard_normal(shape)
    if pool_order:
        compare(chapter, fast, x, rng=rng, out_to_natural=pool_order_to_natural,
                dout_to_fast=natural_to_pool_order)
        assert fast.forward(x).shape == (4, 4, shape[0]) + tuple((s + 2 * pad - K + 1) // 2 for s in shape[2:])
    else:
        compare(chapter, fast, x, rng=rng)
    if shape[0] >= 40:                                     # the chunked weight gradient was used
        N = shape[0]
        assert fl.column_chunks(fast.cols, N, fast.cols.shape[2] // N).shape[1] > 1
    # need_dx=False: no input gradient, the same parameter gradients
    dout = fast.forward(x).copy()
    fast.backward(dout, need_dx=True)
    with_dx = {name: g.copy() for name, g in fast.grads.items()}
    assert fast.backward(dout, need_dx=False) is None
    for name in with_dx:
        np.testing.assert_array_equal(fast.grads[name], with_dx[name])


@pytest.mark.parametrize("layout", ["channel by channel", "strided view"])
@pytest.mark.parametrize("pad, pool_order", [(0, False), (1, False), (0, True), (1, True)])
def test_fast_conv_reads_inputs_stored_in_any_order(rng, layout, pad, pool_order):
    """A conv after a ReLU or batch norm of a plain conv gets maps stored channel by channel."""
    chapter, fast = twins("conv", 2, 3, 3, pad, rng=rng)
    fast.pool_order = pool_order
    x = rng.standard_normal((3, 2, 10, 12))
    x_fast = channel_major(x) if layout == "channel by channel" else every_other(x)
    convert = dict(out_to_natural=pool_order_to_natural, dout_to_fast=natural_to_pool_order) if pool_order else {}
    compare(chapter, fast, x, rng=rng, x_fast=x_fast, **convert)


@pytest.mark.parametrize("pool_order, pad", [(False, 0), (False, 2), (True, 0), (True, 1)])
def test_fast_conv_reuses_its_work_arrays_and_gives_the_right_next_answer(rng, pool_order, pad):
    """The same layer called again with other inputs (a smaller last batch, then the full one
    again) answers for the new input: no stale padding, columns, output or gradient."""
    chapter, fast = twins("conv", 2, 3, 3, pad, rng=rng)
    fast.pool_order = pool_order
    first = fast.forward(rng.standard_normal((6, 2, 8, 8)) * 5)
    first_cols = fast.cols
    convert = dict(out_to_natural=pool_order_to_natural, dout_to_fast=natural_to_pool_order) if pool_order else {}
    for step, n in enumerate((6, 2, 6)):
        x = rng.standard_normal((n, 2, 8, 8))
        if step == 0:                                       # the same work arrays, refilled
            assert np.shares_memory(fast.forward(x), first) and np.shares_memory(fast.cols, first_cols)
        compare(chapter, fast, x, rng=rng, **convert)


# --- the fast path's im2col and col2im ------------------------------------------------
# (xp shape (C, N, Hpad, Wpad), K); pool order needs Hpad - K + 1 and Wpad - K + 1 even
IM2COL_CASES = [((1, 2, 8, 8), 3), ((3, 2, 9, 7), 3), ((2, 3, 10, 8), 5), ((2, 1, 7, 9), 4),
                ((1, 3, 6, 6), 1)]


def im2col_output_even(xp_shape, K):
    return conv_output_even((0, 0) + xp_shape[2:], K, 0)


@pytest.mark.parametrize("xp_shape, K", IM2COL_CASES)
def test_fast_im2col_matches_the_loop_and_ends_with_a_row_of_ones(rng, xp_shape, K):
    xp = rng.standard_normal(xp_shape)                      # the fast path's (C, N, Hpad, Wpad)
    C = xp_shape[0]
    cols = fl.im2col(xp, K)
    assert cols.shape[:2] == (1, C * K * K + 1)
    np.testing.assert_array_equal(cols[0, :-1], im2col_naive(xp.transpose(1, 0, 2, 3), K))
    np.testing.assert_array_equal(cols[0, :-1], m.im2col(xp.transpose(1, 0, 2, 3), K))
    np.testing.assert_array_equal(cols[0, -1], 1.0)
    if im2col_output_even(xp_shape, K):
        cols = fl.im2col_pool_order(xp, K)
        assert cols.shape[:2] == (4, C * K * K + 1)
        np.testing.assert_array_equal(cols[:, :-1], im2col_pool_order_naive(xp, K))
        np.testing.assert_array_equal(cols[:, -1], 1.0)


@pytest.mark.parametrize("xp_shape, K, pool_order",
                         [case + (False,) for case in IM2COL_CASES]
                         + [case + (True,) for case in IM2COL_CASES if im2col_output_even(*case)])
def test_fast_col2im_is_the_adjoint_of_its_im2col(rng, xp_shape, K, pool_order):
    """<im2col(x), c> == <x, col2im(c)> for random x and c: col2im adds each column back
    onto exactly the pixels im2col copied it from (the row of ones left out)."""
    im2col, col2im = (fl.im2col_pool_order, fl.col2im_pool_order) if pool_order else (fl.im2col, fl.col2im)
    C = xp_shape[0]
    for ws in (None, {}):
        xp = rng.standard_normal(xp_shape)
        cols = im2col(xp, K, ws)[:, :C * K * K]            # without the bias's row of ones
        c = rng.standard_normal(cols.shape)
        back = col2im(np.ascontiguousarray(c), xp_shape, K, ws)
        assert back.shape == xp_shape
        assert np.sum(cols * c) == pytest.approx(np.sum(xp * back), rel=1e-12)
        # twice with one workspace: col2im's work array is cleared, not added to
        again = col2im(np.ascontiguousarray(c), xp_shape, K, ws).copy()
        np.testing.assert_allclose(again, col2im(np.ascontiguousarray(c), xp_shape, K, None), rtol=1e-14)


def test_column_chunks_cut_whole_maps_and_keep_every_column(rng):
    a = rng.standard_normal((4, 3, 40 * 9))                 # 4 blocks, 3 rows, 40 maps of 9 pixels
    chunks = fl.column_chunks(a, 40, 9)
    blocks, n, rows, width = chunks.shape
    assert (blocks, rows) == (4, 3) and n > 1 and width % 9 == 0 and n * width == 40 * 9
    np.testing.assert_array_equal(chunks.transpose(0, 2, 1, 3).reshape(a.shape), a)


# =====================================================================================
# ReLU, pool, batch norm, flatten, dense
# =====================================================================================
RELU_LAYOUTS = ["contiguous", "channel by channel", "strided view", "pool order", "features"]


def in_layout(x, layout):
    """(the input in the layout, out_to_natural): x is (N, C, H, W) with even H and W."""
    if layout == "pool order":
        return natural_to_pool_order(x), pool_order_to_natural
    if layout == "features":
        return x.reshape(len(x), -1), None
    return {"contiguous": x, "channel by channel": channel_major(x), "strided view": every_other(x)}[layout], None


@pytest.mark.parametrize("layout", RELU_LAYOUTS)
def test_fast_relu_equals_the_chapter_relu(rng, layout):
    x = rng.standard_normal((4, 3, 6, 6))
    x[0, 0, 0, :3] = 0.0                                        # at the kink: no gradient
    x_fast, to_natural = in_layout(x, layout)
    x_chapter = x.reshape(4, -1) if layout == "features" else x
    relu_c, relu_f = m.ReLU(), fl.FastReLU()
    out_c = relu_c.forward(x_chapter)
    out_f = relu_f.forward(x_fast)
    np.testing.assert_array_equal(to_natural(out_f) if to_natural else out_f, out_c)
    dout = rng.standard_normal(out_c.shape)
    dx_c = relu_c.backward(dout)
    dout_f = natural_to_pool_order(dout) if layout == "pool order" else dout
    # the gradient may come stored unlike the input (the pool's is image by image)
    for d in (dout_f, dout_f.T.copy().T):
        dx_f = relu_f.backward(d)
        np.testing.assert_array_equal(to_natural(dx_f) if to_natural else dx_f, dx_c)


@pytest.mark.parametrize("shape, pool_order", [
    ((2, 3, 4, 4), False), ((2, 3, 5, 5), False), ((3, 2, 7, 6), False), ((1, 1, 28, 28), False),
    ((2, 1, 3, 9), False), ((2, 3, 4, 4), True), ((3, 2, 6, 8), True), ((2, 4, 26, 26), True),
])
def test_fast_pool_equals_the_chapter_pool(rng, shape, pool_order):
    chapter, fast = m.MaxPool(), fl.FastMaxPool()
    fast.pool_order = pool_order
    a = rng.standard_normal(shape)
    if pool_order:
        compare(chapter, fast, a, rng=rng, x_fast=natural_to_pool_order(a), dx_to_natural=pool_order_to_natural)
    else:
        compare(chapter, fast, a, rng=rng)
        compare(chapter, fast, channel_major(a), rng=rng)        # a plain conv's output as it is stored


@pytest.mark.parametrize("case, pool_order", [("every tie", False), ("every tie", True),
                                              ("odd edge", False), ("few values", False),
                                              ("few values", True), ("blank", True)])
def test_fast_pool_breaks_ties_as_the_chapter_does(rng, case, pool_order):
    """Ties of every kind: the gradient goes to the same single position as the chapter's."""
    if case == "every tie":
        a = every_tie_pattern()
    elif case == "odd edge":
        a = every_tie_pattern(odd_edge=True)
    elif case == "few values":
        a = rng.integers(0, 3, (2, 3, 6, 6)).astype(float)
    else:
        a = np.zeros((2, 3, 6, 6))
    dout = rng.integers(1, 9, (a.shape[0], a.shape[1], a.shape[2] // 2, a.shape[3] // 2)).astype(float)
    chapter, fast = m.MaxPool(), fl.FastMaxPool()
    fast.pool_order = pool_order
    out_c, da_c = chapter.forward(a), chapter.backward(dout)
    out_f = fast.forward(natural_to_pool_order(a) if pool_order else a)
    np.testing.assert_array_equal(out_f, out_c)
    da_f = fast.backward(dout.copy())
    np.testing.assert_array_equal(pool_order_to_natural(da_f) if pool_order else da_f, da_c)
    assert da_c.sum() == dout.sum() and np.count_nonzero(da_c) == dout.size   # one position per window


BN_LAYOUTS = ["maps", "maps channel by channel", "pool order", "features"]


def bn_case(rng, layout, scale=3.0, shift=1.5):
    """(x for the chapter, the same values for the fast layer, out_to_natural)."""
    if layout == "features":
        x = rng.standard_normal((6, 4)) * scale + shift
        return x, x, None
    x = rng.standard_normal((3, 4, 4, 6)) * scale + shift
    if layout == "maps":
        return x, x, None
    if layout == "maps channel by channel":
        return x, channel_major(x), None
    return x, natural_to_pool_order(x), pool_order_to_natural


@pytest.mark.parametrize("train", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_fast_batchnorm_equals_the_chapter_batchnorm(rng, layout, train):
    chapter, fast = twins("bn", 4, rng=rng, dtype=np.float64)
    for step in range(3):                                    # the running statistics move alike
        x, x_fast, to_natural = bn_case(rng, layout, shift=step)
        convert = dict(out_to_natural=to_natural, dout_to_fast=natural_to_pool_order,
                       dx_to_natural=to_natural) if to_natural else {}
        compare(chapter, fast, x, train=train, rng=rng, x_fast=x_fast, **convert)
    assert int(fast.buffers["num_batches_tracked"]) == (3 if train else 0)


@pytest.mark.parametrize("x_layout, dout_layout", [("maps", "channel by channel"),
                                                   ("maps channel by channel", "contiguous"),
                                                   ("maps", "strided view")])
def test_fast_batchnorm_with_dout_stored_unlike_x(rng, x_layout, dout_layout):
    """After a plain conv the maps are stored channel by channel, the pool's gradient image by image."""
    chapter, fast = twins("bn", 4, rng=rng, dtype=np.float64)
    x, x_fast, _ = bn_case(rng, x_layout)
    layout = {"channel by channel": channel_major, "contiguous": np.ascontiguousarray,
              "strided view": every_other}[dout_layout]
    compare(chapter, fast, x, rng=rng, x_fast=x_fast, dout_to_fast=layout)


@pytest.mark.parametrize("stored", ["contiguous", "channel by channel", "strided view"])
def test_fast_flatten_equals_the_chapter_flatten(rng, stored):
    x = rng.standard_normal((3, 2, 4, 5))
    x_fast = {"contiguous": x, "channel by channel": channel_major(x), "strided view": every_other(x)}[stored]
    compare(m.Flatten(), fl.FastFlatten(), x, rng=rng, x_fast=x_fast)


@pytest.mark.parametrize("shape", [(5, 7), (1, 3), (40, 100)])
def test_fast_dense_equals_the_chapter_dense(rng, shape):
    chapter, fast = twins("fc", shape[1], 6, rng=rng)
    for n in (shape[0], max(shape[0] // 2, 1), shape[0]):   # a smaller batch between
        compare(chapter, fast, rng.standard_normal((n, shape[1])), rng=rng)
    assert fast.backward(rng.standard_normal((shape[0], 6)), need_dx=False) is None


# =====================================================================================
# Spans joined by pool order: conv, then ReLU and batch norm, then pool
# =====================================================================================
SPANS = [
    ("relu", "pool"),                      # the seed network's: the ReLU runs after the pool
    ("bn", "relu", "pool"),                # the deep network's
    ("bn", "pool"),
    ("relu", "bn", "pool"),                # the ReLU not right before the pool: stays in front
    ("relu", "relu", "pool"),
    ("pool",),
    ("relu", "bn", "relu", "pool"),
]


def span_layers(kinds, C, F, K, pad, rng):
    """(chapter layers, fast layers): a conv then the kinds, the same parameters."""
    chapter, fast = [], []
    for kind in ("conv",) + kinds:
        args = {"conv": (C, F, K, pad), "bn": (F,)}.get(kind, ())
        kwargs = {"dtype": np.float64} if kind == "bn" else {}
        c, f = twins(kind, *args, rng=rng, **kwargs)
        chapter.append(c)
        fast.append(f)
    return chapter, fast


@pytest.mark.parametrize("kinds", SPANS, ids=[" ".join(s) for s in SPANS])
@pytest.mark.parametrize("x_shape, K, pad", [((3, 1, 8, 8), 3, 0), ((2, 2, 8, 6), 3, 1),
                                             ((2, 3, 10, 8), 5, 2), ((2, 2, 9, 9), 4, 0)])
def test_pool_order_span_equals_the_chapter_layers(rng, kinds, x_shape, K, pad):
    """A conv whose maps reach a pool through ReLU and batch norm only writes them in pool
    order; a ReLU right before that pool runs after it.  The span gives the chapter's output,
    input gradient and every parameter gradient, training and evaluation."""
    chapter, fast = span_layers(kinds, x_shape[1], 3, K, pad, rng)
    fast[0].out_even = True                               # every case's conv output is even
    run = fl.agree_on_pool_order(fast)
    assert fast[0].pool_order and fast[-1].pool_order
    if kinds[-2:] == ("relu", "pool"):
        assert run[-2:] == [fast[-1], fast[-2]]               # the pool first, then the ReLU
    else:
        assert run == fast
    for train in (True, False, True):
        x = rng.standard_normal(x_shape)
        h = x
        for layer in chapter:
            h = layer.forward(h, train)
        dout = rng.standard_normal(h.shape)
        d = dout
        for layer in reversed(chapter):
            d = layer.backward(d)
        hf = x
        for layer in run:
            hf = layer.forward(hf, train)
        assert_same(np.array(hf), h, "output")
        df = dout.copy()
        for layer in reversed(run):
            df = layer.backward(df)
        assert_same(np.array(df), d, "input gradient")
        for c, f in zip(chapter, fast):
            for name in c.grads:
                assert_same(f.grads[name], c.grads[name], f"{c.kind} {name} gradient")
            for name in c.buffers:
                assert_same(np.asarray(f.buffers[name]), np.asarray(c.buffers[name]), f"{c.kind} {name}")


def test_an_odd_conv_output_keeps_the_plain_layout(rng):
    chapter, fast = span_layers(("relu", "pool"), 1, 3, 4, 0, rng)       # 8x8 -> 5x5: odd
    fast[0].out_even = False
    run = fl.agree_on_pool_order(fast)
    assert run == fast and not fast[0].pool_order and not fast[2].pool_order


# =====================================================================================
# Whole networks
# =====================================================================================
# spec, expected run order, expected pool_order of each conv in order
AGREEMENT_CASES = [
    ("seed", "conv pool relu flatten fc relu fc", [True]),
    ("deep", "conv bn pool relu conv bn pool relu flatten fc relu fc", [True, True]),
    ("conv8 relu conv16 relu pool fc10", "conv relu conv pool relu flatten fc", [False, True]),
    # 25x25 output (odd): the plain layout and the written order
    ("conv4x4 relu pool fc10", "conv relu pool flatten fc", [False]),
    ("conv4x4p1 bn relu pool fc10", "conv bn relu pool flatten fc", [False]),
    # the pool order through batch norm; a ReLU not right before the pool stays
    ("conv3 relu bn pool fc10", "conv relu bn pool flatten fc", [True]),
    # dropout breaks the span: its mask is drawn in the chapter's (N, C, H, W) order
    ("conv3p1 bn relu dropout0.5 pool conv4 relu pool fc10",
     "conv bn relu dropout pool conv pool relu flatten fc", [False, True]),
    # the second pool follows a pool, not a conv: plain, and its ReLU stays in front of it
    ("conv4 relu pool relu pool fc10", "conv pool relu relu pool flatten fc", [True]),
    ("conv3x5p2 relu pool conv2x2 relu pool fc16 bn relu fc10",
     "conv pool relu conv relu pool flatten fc bn relu fc", [True, False]),
    ("conv3 pool relu conv5 bn pool fc10", "conv pool relu conv bn pool flatten fc", [True, False]),
]


@pytest.mark.parametrize("spec, run_order, pool_orders", AGREEMENT_CASES)
def test_run_order_and_pool_order_agreed(spec, run_order, pool_orders):
    net = fl.FastNetwork(spec, np.random.default_rng(0), dtype=np.float64)
    assert " ".join(layer.kind for layer in net.run_order) == run_order
    convs = [layer for layer in net.layers if isinstance(layer, fl.FastConv)]
    assert [conv.pool_order for conv in convs] == pool_orders
    for i, layer in enumerate(net.layers):
        if isinstance(layer, fl.FastMaxPool):
            # a pool runs in pool order exactly when the conv before it (through ReLU and
            # batch norm only) does
            j = i - 1
            while isinstance(net.layers[j], (fl.FastReLU, fl.FastBatchNorm)):
                j -= 1
            agreed = isinstance(net.layers[j], fl.FastConv) and net.layers[j].pool_order
            assert layer.pool_order == agreed
            if agreed and isinstance(net.layers[i - 1], fl.FastReLU):
                k = net.run_order.index(layer)
                assert net.run_order[k + 1] is net.layers[i - 1]
    assert sorted(map(id, net.run_order)) == sorted(map(id, net.layers))


NETWORK_SPECS = [
    "seed", "deep",
    "conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10",
    "conv5x5p2 bn relu pool conv7 relu pool fc10",
    "conv3 pool relu conv5 bn pool fc10",
    "conv8 relu conv16 relu pool fc10",
    "conv4x4 relu pool fc10",                               # 25x25: odd, plain layout
    "conv4x4p1 bn relu pool fc16 bn relu fc10",             # odd, batch norm on maps and features
    "conv3 relu bn pool fc10",
    "conv3p1 bn relu dropout0.5 pool conv4 relu pool fc10",
    "conv4 relu pool relu pool fc10",
    "conv3x5p2 relu pool conv2x2 relu pool fc16 bn relu fc10",
    "conv2x6p1 relu pool conv3x3p2 bn relu pool fc10",      # 25x25 -> 12x12 -> 14x14 -> 7x7
    "fc12 relu fc10",                                       # no map at all
]


def twin_networks(spec, seed=0, dtype=np.float64):
    """(chapter Network, FastNetwork) from the same seed, batch norm moved off the identity
    alike (its parameters and running statistics)."""
    nets = m.Network(spec, np.random.default_rng(seed), dtype=dtype), \
        fl.FastNetwork(spec, np.random.default_rng(seed), dtype=dtype)
    for net in nets:
        rng = np.random.default_rng(seed + 100)
        for name, value in net.state.items():
            if name.startswith("bn") and not name.endswith("num_batches_tracked"):
                value[...] = rng.uniform(0.5, 1.5, value.shape) if name.endswith(("weight", "running_var")) \
                    else rng.standard_normal(value.shape) * 0.3
    np.testing.assert_array_equal(nets[0].flat, nets[1].flat)
    return nets


def truly_zero(net):
    """Names of the gradients that are 0 but for rounding: the bias of a conv or dense layer
    right before batch norm, whose mean the normalisation subtracts."""
    names = {id(layer): prefix for prefix, layer in net.named}
    return {f"{names[id(a)]}.bias" for a, b in zip(net.layers, net.layers[1:])
            if a.kind in ("conv", "fc") and b.kind == "bn"}


@pytest.mark.parametrize("spec", NETWORK_SPECS)
def test_fast_network_equals_the_chapter_network(spec):
    """Same seed, float64: the same loss, logits, input gradient and every parameter gradient
    over three training steps (batches of 5, 2, 5: the work arrays resized and reused), the
    same running statistics, then the same evaluation logits."""
    chapter, fast = twin_networks(spec)
    zero = truly_zero(chapter)
    data = np.random.default_rng(5)
    for n in (5, 2, 5):
        x, y = data.standard_normal((n, 1, 28, 28)), data.integers(0, 10, n)
        results = []
        for net in (chapter, fast):
            logits = net.forward(x, train=True)
            loss, dlogits = m.softmax_cross_entropy(logits, y)
            dx = np.array(net.backward(dlogits, input_grad=True))
            results.append((logits, loss, dx))
        (logits_c, loss_c, dx_c), (logits_f, loss_f, dx_f) = results
        assert loss_f == pytest.approx(loss_c, rel=NET_RTOL)
        assert_same(logits_f, logits_c, "logits", NET_RTOL)
        assert_same(dx_f, dx_c, "input gradient", NET_RTOL)
        assert_gradients_equal(fast, chapter, zero, NET_RTOL)
        for name, value in chapter.state.items():
            assert_same(np.asarray(fast.state[name]), np.asarray(value), name, NET_RTOL)
        # the same step for both, then another batch
        for net in (chapter, fast):
            net.flat -= 0.05 * chapter.grad
    x = data.standard_normal((4, 1, 28, 28))
    assert_same(fast.forward(x, train=False), chapter.forward(x, train=False), "evaluation logits", NET_RTOL)


def test_zero_gradients_are_found_and_compared():
    """The specs above with batch norm do have gradients compared absolutely, and only those."""
    chapter, _ = twin_networks("conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10")
    assert truly_zero(chapter) == {"conv2.bias", "fc1.bias"}
    assert truly_zero(m.Network("seed", np.random.default_rng(0))) == set()


def training_images():
    """1,600 real MNIST test images (harder than synthetic ones: the loss stays well above 0);
    without the data (a fresh clone), synthetic ones: a blocky template per class with noise,
    a fifth of the labels random, so that the loss also stays well above 0 after 50 steps
    (at a loss near 0, float32's last digit alone is a large relative difference)."""
    try:
        images, labels = m.load_split(m.DATA_DIR, "test")
        return images[:1600], labels[:1600], True
    except m.DataError:
        rng = np.random.default_rng(0)
        templates = np.kron(rng.random((10, 7, 7)), np.ones((4, 4)))          # (10, 28, 28) in 0..1
        labels = rng.integers(0, 10, 1600)
        images = 128 + 100 * (templates[labels] - 0.5) + rng.normal(0, 30, (1600, 28, 28))
        labels = np.where(rng.random(1600) < 0.2, rng.integers(0, 10, 1600), labels)
        return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels, False


@pytest.fixture(scope="module")
def images():
    return training_images()


@pytest.mark.parametrize("spec", ["seed", "deep", "conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10",
                                  "conv5x5p2 bn relu pool conv7 relu pool fc10",
                                  "conv3 pool relu conv5 bn pool fc10", "conv4x4p1 bn relu pool fc16 relu fc10"])
def test_fifty_float32_training_steps_end_at_the_same_loss(images, spec):
    """The default run: float32, the fast path with its in-place optimizers against the
    chapter with its own, dual optimizer, cosine schedule, the same batches of 32.

    Float32 rounding differs from CPU to CPU (BLAS kernels, NumPy's SIMD loops) and training
    is chaotic: a last-bit difference grows step after step (measured, deep on real MNIST:
    relative 6e-5 at step 20, up to 5.4e-3 from step 30; conv3 pool relu conv5 on synthetic
    images with other BLAS kernels: 6e-5 by step 5, up to 8e-3).  So the first step, where
    nothing has diverged yet, is held tight; the fifty only to what rounding drift allows."""
    chapter, fast, losses, first_grads = train_side_by_side(spec, images, np.float32)
    # 1) the first step: the same weights and batch, so the same loss and every gradient to
    #    float32's rounding (measured on four BLAS kernels: loss 1e-7, gradients 1e-5 relative,
    #    the ones 0 but for rounding below 1.1e-6); a wrong gradient is off by far more
    assert losses[0, 1] == pytest.approx(losses[0, 0], rel=1e-5)
    chapter_grads, fast_grads = first_grads
    assert_float32_gradients_equal(fast_grads, chapter_grads, truly_zero(chapter),
                                   rtol=1e-4, zero_atol=1e-5)
    # 2) the first update: the loss after it within 1e-4 (measured at most 1.7e-6)
    assert losses[1, 1] == pytest.approx(losses[1, 0], rel=1e-4)
    # 3) both trained
    assert losses[-1, 0] < 0.8 * losses[0, 0] and losses[-1, 1] < 0.8 * losses[0, 1]
    # 4) the last losses within 5e-2: the drift measured reached 8e-3 at most, a network
    #    that trains differently (a sign flipped in one gradient) ends 0.3 to 7 apart
    assert losses[-1, 1] == pytest.approx(losses[-1, 0], rel=5e-2)


def assert_float32_gradients_equal(fast, chapter, zero_names, rtol, zero_atol):
    """Each gradient (name -> array) within rtol of the chapter's, over the whole array;
    those that are 0 but for rounding (zero_names, or any the data make 0) below zero_atol
    on both sides."""
    assert list(fast) == list(chapter)
    for name, g in chapter.items():
        f = fast[name]
        if name in zero_names or np.abs(g).max() < zero_atol:
            assert max(np.abs(f).max(), np.abs(g).max()) < zero_atol, name
        else:
            error = np.linalg.norm(f - g) / np.linalg.norm(g)
            assert error <= rtol, (name, error)


@pytest.mark.parametrize("spec", ["seed", "deep", "conv3 pool relu conv5 bn pool fc10"])
def test_fifty_float64_training_steps_stay_equal(images, spec):
    """The same 50 steps in float64: no drift at all, so a float32 difference is rounding."""
    chapter, fast, losses, _ = train_side_by_side(spec, images, np.float64)
    np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=1e-9)
    # a conv bias right before batch norm has a true gradient of 0: Adam turns the two paths'
    # rounding noise there into steps of their own, so those few weights match only to ~1e-9
    np.testing.assert_allclose(fast.flat, chapter.flat, rtol=1e-7, atol=1e-8)


def train_side_by_side(spec, images, dtype, steps=50, batch=32):
    """The chapter's network and optimizer and the fast path's, from the same start, on the same
    batches (dual optimizer, cosine schedule): (chapter, fast, losses (steps, 2), the first
    step's gradients (chapter's, fast's: name -> array))."""
    chapter = m.Network(spec, np.random.default_rng(0), dtype=dtype)
    fast = fl.FastNetwork(spec, np.random.default_rng(0), dtype=dtype)
    optimizers = m.make_optimizer("dual", chapter), fl.make_optimizer("dual", fast)
    assert type(optimizers[1]) is fl.FastDual and type(optimizers[0]) is m.Dual
    x_all, y_all, _ = images
    losses, first_grads = [], []
    for step in range(steps):
        x = m.to_input(x_all[batch * step:batch * (step + 1)]).astype(dtype)
        y = y_all[batch * step:batch * (step + 1)]
        row = []
        for net, opt in zip((chapter, fast), optimizers):
            loss, _ = m.loss_and_grads(net, x, y)
            if step == 0:
                first_grads.append({name: g.copy() for name, g in net.grads.items()})
            net.flat += opt.update(net.grad, m.cosine_scale(step, steps))
            row.append(loss)
        losses.append(row)
    return chapter, fast, np.array(losses), first_grads


# =====================================================================================
# Optimizers
# =====================================================================================
OPTIMIZER_NAMES = ["adam", "adamw", "momentum", "dual"]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_fast_optimizers_equal_the_chapter_ones(name):
    """Several steps in float64 with a falling lr_scale, each optimizer on its own copy of
    the parameters (AdamW decays the weights it is given)."""
    nets = twin_networks("conv3 bn relu pool fc8 relu fc10")
    optimizers = [maker(name, net, adam_lr=0.01, sgd_lr=0.05, momentum=0.8, weight_decay=0.1)
                  for maker, net in zip((m.make_optimizer, fl.make_optimizer), nets)]
    fast_kind = {"adam": fl.FastAdam, "adamw": fl.FastAdamW, "momentum": fl.FastMomentum, "dual": fl.FastDual}
    assert type(optimizers[1]) is fast_kind[name]
    rng = np.random.default_rng(9)
    for t in range(6):
        g = rng.standard_normal(nets[0].flat.size) * 10.0 ** rng.integers(-4, 2)
        g[:5] = 0.0                                         # entries with no gradient
        scale = m.cosine_scale(t, 6)
        steps = [np.array(opt.update(g.copy(), scale)) for opt in optimizers]
        np.testing.assert_allclose(steps[1], steps[0], rtol=1e-12, atol=1e-15)
        for net, step in zip(nets, steps):
            net.flat += step
    assert not np.array_equal(nets[0].flat, twin_networks("conv3 bn relu pool fc8 relu fc10")[0].flat)


# =====================================================================================
# differs_from_chapter: the start-up check, both ways
# =====================================================================================
@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("spec", NETWORK_SPECS)
def test_differs_from_chapter_finds_nothing_on_the_real_code(spec, optimizer):
    assert fl.differs_from_chapter(spec, optimizer) is None


def leaky_forward(self, x, train=True):
    self.x = x
    return np.maximum(x, 0.1 * x)


def leaky_backward(self, dout, need_dx=True):
    return dout * np.where(self.x > 0, 1.0, 0.1)


def doubled_weight_gradient(self, dout, need_dx=True):
    dx = REAL_DENSE_BACKWARD(self, dout, need_dx)
    self.grads["weight"] *= 2
    return dx


def adam_without_the_power_t(self, g, lr_scale=1.0):
    """The bias corrections with beta instead of beta**t: the same first step, then not."""
    self.t += 1
    self.m = self.beta1 * self.m + (1 - self.beta1) * g
    self.v = self.beta2 * self.v + (1 - self.beta2) * g * g
    m_hat, v_hat = self.m / (1 - self.beta1), self.v / (1 - self.beta2)
    return -self.lr * lr_scale * m_hat / (np.sqrt(v_hat) + self.eps)


def biased_running_variance(self, x, train=True):
    out = REAL_BN_FORWARD(self, x, train)
    if train:                                   # as if the update had used var, not var*M/(M-1)
        self.buffers["running_var"] *= 1.01
    return out


REAL_DENSE_BACKWARD, REAL_BN_FORWARD = m.Dense.backward, m.BatchNorm.forward


@pytest.mark.parametrize("patches, spec, optimizer, named, not_named", [
    ([("forward", m.ReLU, leaky_forward), ("backward", m.ReLU, leaky_backward)], "seed", "dual",
     ["output"], ["evaluation", "gradient"]),
    ([("backward", m.Dense, doubled_weight_gradient)], "conv3 relu pool fc8 relu fc10", "dual",
     ["fc1.weight", "gradient"], ["input", "output"]),
    ([("update", m.Adam, adam_without_the_power_t)], "seed", "adam", ["adam", "step"], ["gradient"]),
    ([("update", m.Adam, adam_without_the_power_t)], "seed", "dual", ["dual", "step"], ["gradient"]),
    ([("forward", m.BatchNorm, biased_running_variance)], "deep", "dual", ["evaluation output"], ["gradient"]),
], ids=["leaky relu", "dense weight x2", "adam t", "dual's adam t", "bn running var"])
def test_differs_from_chapter_names_a_changed_chapter_layer(monkeypatch, patches, spec, optimizer, named,
                                                             not_named):
    """A learner's edit of a chapter layer: the fast path no longer computes the same, and
    the check says what differs first; the run then uses the chapter (choose_layers)."""
    assert fl.differs_from_chapter(spec, optimizer) is None
    for method, cls, replacement in patches:
        monkeypatch.setattr(cls, method, replacement)
    difference = fl.differs_from_chapter(spec, optimizer)
    assert isinstance(difference, str)
    assert all(word in difference for word in named) and not any(word in difference for word in not_named), \
        difference
    lines = []
    args = argparse.Namespace(plain=False, quiet=True, net=spec, optimizer=optimizer)
    assert m.choose_layers(args, lines.append) == (m.Network, m.make_optimizer)
    assert len(lines) == 1 and difference in lines[0] and "running the chapter" in lines[0]


def relu_backward_passing_everything(self, dout, need_dx=True):
    return dout


def pool_forward_crashing(self, a, train=True):
    raise IndexError("a planted bug")


def conv_dropping_its_bias_in_pool_order(self, x, train=True):
    out = REAL_FAST_CONV_FORWARD(self, x, train)
    return out - self.params["bias"][:, None, None, None] if self.pool_order else out


REAL_FAST_CONV_FORWARD = fl.FastConv.forward


@pytest.mark.parametrize("cls, method, replacement, spec, named", [
    (fl.FastReLU, "backward", relu_backward_passing_everything, "seed", ["input gradient"]),
    (fl.FastMaxPool, "forward", pool_forward_crashing, "deep", ["fast path failed", "IndexError"]),
    (fl.FastConv, "forward", conv_dropping_its_bias_in_pool_order, "seed", ["output"]),
], ids=["fast relu", "fast pool crashes", "fast conv in pool order"])
def test_differs_from_chapter_names_a_broken_fast_layer(monkeypatch, cls, method, replacement, spec, named):
    monkeypatch.setattr(cls, method, replacement)
    difference = fl.differs_from_chapter(spec)
    assert isinstance(difference, str) and all(word in difference for word in named), difference
    assert "evaluation" not in difference
    args = argparse.Namespace(plain=False, quiet=True, net=spec, optimizer="dual")
    assert m.choose_layers(args, lambda line: None) == (m.Network, m.make_optimizer)


def test_choose_layers_takes_the_fast_path_when_it_agrees():
    args = argparse.Namespace(plain=False, quiet=False, net="seed", optimizer="dual", batch_size=128)
    lines = []
    assert m.choose_layers(args, lines.append) == (fl.FastNetwork, fl.make_optimizer)
    assert len(lines) == 1 and lines[0].startswith("layers: the fast path")


# =====================================================================================
# What the fast path hands out belongs to the caller
# =====================================================================================
@pytest.mark.parametrize("spec", ["seed", "deep", "conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10",
                                  "fc12 relu fc10"])
@pytest.mark.parametrize("train", [True, False], ids=["training", "evaluation"])
def test_fast_network_logits_are_not_overwritten_by_the_next_forward(spec, train):
    net = fl.FastNetwork(spec, np.random.default_rng(0))
    data = np.random.default_rng(1)
    x1, x2 = data.standard_normal((2, 4, 1, 28, 28)).astype(np.float32)
    a = net.forward(x1, train=train)
    kept = a.copy()
    b = net.forward(x2, train=train)
    assert a is not b and not np.shares_memory(a, b)
    np.testing.assert_array_equal(a, kept)
    assert not np.array_equal(a, b)
    loss, logits = m.loss_and_grads(net, x1, np.arange(4))
    kept = logits.copy()
    m.loss_and_grads(net, x2, np.arange(4))
    np.testing.assert_array_equal(logits, kept)


def test_fast_predictions_and_probabilities_are_the_callers(images):
    net = fl.FastNetwork("deep", np.random.default_rng(0))
    x, y, _ = images
    probs = m.predict_proba(net, x[:300])
    kept = probs.copy()
    accuracy, pred, probs2 = m.evaluate(net, x[300:600], y[300:600])
    kept_pred, kept_probs2 = pred.copy(), probs2.copy()
    m.predict_proba(net, x[600:900])
    m.evaluate(net, x[900:1200], y[900:1200])
    np.testing.assert_array_equal(probs, kept)
    np.testing.assert_array_equal(pred, kept_pred)
    np.testing.assert_array_equal(probs2, kept_probs2)
    assert not np.array_equal(probs[:100], probs2[:100])


@pytest.mark.parametrize("spec", ["seed", "deep"])
def test_fast_input_gradient_is_not_overwritten_by_the_next_backward(spec):
    net = fl.FastNetwork(spec, np.random.default_rng(0), dtype=np.float64)
    data = np.random.default_rng(1)
    x1, x2 = data.standard_normal((2, 3, 1, 28, 28))
    y = np.array([1, 2, 3])
    dx1 = net.backward(m.softmax_cross_entropy(net.forward(x1), y)[1], input_grad=True)
    kept = dx1.copy()
    net.backward(m.softmax_cross_entropy(net.forward(x2), y)[1], input_grad=True)
    np.testing.assert_array_equal(dx1, kept)
