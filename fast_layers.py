"""The fast path: the layers of mnist_net.py (the chapter), computing the same numbers faster.

python3 mnist_net.py uses these by default (--plain runs the chapter's own), after checking
on one small batch that they still agree with the chapter's layers (differs_from_chapter):
a learner who edits a chapter layer runs their edit.  tests/test_fast_path.py proves every
class here equal to its chapter class, in float64, on every layout and option it handles,
and the seed and deep networks whole.

Each class has the chapter class's methods and arguments; what it does differently is
speed machinery a reader of the chapter need not follow, each trick with what it bought
(measured on the project's 2-core machine, batch 128, seed network unless said):

- Work arrays reused across steps (buffer, buffer_like): a fresh multi-megabyte array every
  step costs thousands of page faults.  They are private: a layer's output here is valid
  until its next forward, and FastNetwork.forward copies the logits it hands out.
- Pool order (agree_on_pool_order): a conv feeding a 2x2 pool writes the four positions of
  every window as four whole blocks, so the pool is a max of four blocks (154 instead of
  1,045 us forward), and a ReLU right before that pool runs after it, on 4x fewer values.
- im2col with a row of ones (the bias comes with the product), three kernel columns per copy
  (12 copies, not 36: im2col 222-333 -> 199-236 us); the weight gradient in chunks of whole
  maps (BLAS is 2.5-3x slower on one product with a tiny side and 40,000 columns).
- Elementwise passes over memory as one long row (flat_together: NumPy is 2x slower on the
  13-value rows of a map); per-channel sums as products with ones (BLAS: 1.3x faster).
- Adam, momentum, AdamW in place: no temporary per operation, Adam's bias corrections
  moved onto the scalars (one pass fewer); the step they return is a work array, used at
  once by the training loop (the one exception to "what a function returns is the caller's").
  Their moments set to 0 below float32's smallest normal number (flush_subnormals): the
  seed network's third epoch took 2.0 s instead of 1.5 without it.
- Slices (the section of that name): every batch cut into two fixed slices, each through
  its own copy of the layers, meeting where batch norm needs the whole batch's sums.  Where
  two_processes.py finds it safe (Linux on x86-64, the 'fork' start method, OpenBLAS set to
  one thread through threadpoolctl, no other thread), slice 1 runs in a worker process on
  the second core and the optimizers update half the parameters each: per step of 64 images
  of the deep network 13.2 -> 8.4 ms, of 128 of the seed network 3.1 -> 2.3 ms.  Everywhere
  else both slices run in this process.  The numbers never depend on where a slice ran, so a
  run is the same, byte for byte, in one process or two, on an idle or a busy machine.
"""
import copy
import itertools
import math

import numpy as np

import mnist_net as chapter

try:
    import two_processes            # slice 1 in a second process, where that is safe
except ModuleNotFoundError as e:    # fast_layers.py copied without it: every slice runs here
    if e.name != "two_processes":
        raise
    two_processes = None


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
    (see FastConv); an elementwise result stored the same way is written in one
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


class FastConv(chapter.Conv):
    """chapter.Conv.  Its output is (N, F, H_out, W_out) stored channel by channel (a
    transposed view of (F, N, H_out, W_out) memory: the product gives it that way), or, in
    pool order, (4, F, N, H_out/2, W_out/2): output pixel (2p + di, 2q + dj) sits in block
    k = 2*di + dj, at (f, n, p, q)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws = {}
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


class FastReLU(chapter.ReLU):
    """chapter.ReLU, written into reused arrays stored in the input's memory order."""

    def __init__(self):
        super().__init__()
        self.ws = {}

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


class FastMaxPool(chapter.MaxPool):
    """chapter.MaxPool (same tournament, same tie rule), on the four blocks of pool order
    when its conv agreed to it, with the tournament's masks and outputs in reused arrays."""
    pool_order = False                     # set by agree_on_pool_order()

    def __init__(self):
        super().__init__()
        self.ws = {}

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


class FastBatchNorm(chapter.BatchNorm):
    """chapter.BatchNorm on any layout with channels on axis 1 (image by image, channel by
    channel, pool order), seen as (B, C, P) without copies; sums as products with ones.

    Its forward and backward are cut into steps (take, centre, normalise; grad_parts,
    input_grad) so that a batch cut into slices, each slice in its own layer, can share
    the batch's statistics: FastNetwork adds the slices' sums between the steps
    (batch_norm_forward_steps, batch_norm_backward_steps)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws = {}

    def forward(self, x, train=True):
        """x with channels on axis 1: (N, C), (N, C, H, W) or (4, C, N, Hp, Wp) -> out, same shape."""
        self.take(x)
        if not train:
            self.centre(self.buffers["running_mean"].astype(x.dtype))
            return self.normalise(self.buffers["running_var"], train=False)
        mean = self.sums() / self.M
        var = self.centre(mean) / self.M
        self.track(mean, var, self.M)
        return self.normalise(var)

    def take(self, x):
        """Keep x, seen as (B, C, P), and this call's work arrays."""
        x = per_channel_layout(x)
        self.out, xc = buffer_like(self.ws, "out", x), buffer_like(self.ws, "xc", x)
        self.x3, self.xc3 = by_channel(x), by_channel(xc)                  # (B, C, P) views
        self.M = self.x3.shape[0] * self.x3.shape[2]                        # values per channel

    def sums(self):
        """x's per-channel sums (training only)."""
        return channel_sums(self.x3)

    def centre(self, mean):
        """xc = x - mean; returns the per-channel sums of xc squared."""
        np.subtract(self.x3, mean[:, None], out=self.xc3)
        return np.einsum("bcp,bcp->c", self.xc3, self.xc3)                 # no temporary

    def track(self, mean, var, M):
        """The running statistics, from a batch of M values per channel."""
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm += self.momentum * (mean - rm)
        rv += self.momentum * (var * M / max(M - 1, 1) - rv)
        self.buffers["num_batches_tracked"] += 1

    def normalise(self, var, train=True):
        """out = gamma * xhat + beta with xhat = xc * inv_std: one scale per channel, then the shift."""
        self.inv_std = (1 / np.sqrt(var + self.eps)).astype(self.xc3.dtype)
        self.train = train
        out3 = by_channel(self.out)
        np.multiply(self.xc3, (self.params["weight"] * self.inv_std)[:, None], out=out3)
        out3 += self.params["bias"][:, None]
        return self.out

    def backward(self, dout, need_dx=True):
        dbeta, dgamma = self.grad_parts(dout)
        return self.input_grad(dbeta, dgamma, self.M) if need_dx else None

    def grad_parts(self, dout):
        """dbeta and dgamma from this layer's values, written as its gradients and returned."""
        d3 = by_channel(per_channel_layout(dout))
        if d3.shape != self.xc3.shape:               # dout is stored in another order than x was
            d = buffer_like(self.ws, "d", self.out)
            d[...] = dout
            d3 = by_channel(d)
        self.d3 = d3
        dbeta = channel_sums(d3)
        dgamma = np.einsum("bcp,bcp->c", d3, self.xc3) * self.inv_std       # sum(dout * xhat)
        self.grads["weight"][...] = dgamma
        self.grads["bias"][...] = dbeta
        return dbeta, dgamma

    def input_grad(self, dbeta, dgamma, M):
        """dx = gamma * inv_std * (dout - dbeta / M - xhat * dgamma / M), xhat = xc * inv_std,
        with the batch's dbeta, dgamma and M (values per channel)."""
        d3, xc3, inv_std, gamma = self.d3, self.xc3, self.inv_std, self.params["weight"]
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


class FastFlatten(chapter.Flatten):
    """chapter.Flatten; maps stored channel by channel are copied into a reused array."""

    def __init__(self):
        super().__init__()
        self.ws = {}

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


class FastDense(chapter.Dense):
    """chapter.Dense, its output and weight gradient written into kept arrays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws = {}

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


FAST_TYPES = dict(chapter.LAYER_TYPES, conv=FastConv, relu=FastReLU, pool=FastMaxPool,
                  bn=FastBatchNorm, flatten=FastFlatten, fc=FastDense)


def agree_on_pool_order(layers):
    """The one speed agreement between layers; returns the order to run them in.

    1) A conv whose maps reach a 2x2 pool through only ReLU or batch norm hands
       them over in pool order (4, F, N, H/2, W/2), the four positions of every window as
       four whole blocks (see FastConv).  It saves the pool picking every other
       value out of (N, F, H, W): 154 instead of 1,045 us forward per batch of 128 for the
       seed network.  The layers between do not notice: ReLU treats every value alike,
       and batch norm works per channel on axis 1, the channel in both layouts.  (Dropout
       is left out: its mask is drawn in (N, C, H, W) order, and must stay the chapter's.)
       Needs an even conv output.
    2) Such a pool runs before a ReLU right in front of it: the max of a window of
       relu(z) is relu of the max of z (ReLU never changes which value is largest), and
       the gradient is the same too (the winner gets dout where it is positive, else no
       one does).  The ReLU then touches 4x fewer values: 10% of a seed training step.
    """
    run = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, FastConv):
            continue
        j = i + 1
        while j < len(layers) and isinstance(layers[j], (FastReLU, FastBatchNorm)):
            j += 1
        if j < len(layers) and isinstance(layers[j], FastMaxPool) and layer.out_even:
            layer.pool_order = layers[j].pool_order = True                      # 1)
            if isinstance(layers[j - 1], FastReLU):
                run[j - 1], run[j] = layers[j], layers[j - 1]                   # 2)
    return run


# --- Slices ---------------------------------------------------------------------------------
# Every batch is cut into two slices of consecutive images, always the same way, and each slice
# runs through a copy of the layers of its own (the same parameters, its own work arrays and
# gradients); the slices' gradients are added in slice order.  The numbers depend on the batch
# alone: never on where a slice ran, on how many cores were free, or on timing, so a run is
# repeatable, idle or busy, in one process or two.  Where it is safe, slice 1 runs in a worker
# process on the second core (two_processes.py: its own module, with the fork, the shared
# memory and the mailboxes); else both slices run here.  The slices meet only where batch norm
# needs the whole batch's sums, dropout its mask, and at the end.
SLICES = 2


def slice_bounds(n, slices=SLICES):
    """[(start, stop)] of at most `slices` runs of consecutive items covering range(n)."""
    k = max(1, min(slices, n))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def add_up(arrays):
    """The arrays' sum, added in the order given (the same numbers on every run)."""
    arrays = list(arrays)
    total = arrays[0].copy()
    for a in arrays[1:]:
        total += a
    return total


# A step program: ("each", f(c, x, board) -> x), run on slice c's array, or ("all", g(board)),
# run once (by the main process) between them, on what the slices wrote on the board (a dict;
# keys (layer, name, c) for slice c's part, (layer, name) for the batch's).

def run_steps(steps, xs, board, mine, peer=None):
    """Run a step program on the slices `mine` of xs (a list: each slice's array replaced by
    what its step returned).  peer: the other process's end (two_processes.py), which meets
    this one at every "all" step; None when every slice of the batch runs here."""
    for kind, f in steps:
        if kind == "each":
            for c in mine:
                xs[c] = f(c, xs[c], board)
        elif peer is None:
            f(board)
        else:
            peer.meet(f, board)
    return xs


def batch_norm_forward_steps(i, bns):
    """Training-mode batch norm over a batch in slices (bns: layer i of each slice): the mean
    and variance are the whole batch's, from the slices' sums added in slice order."""
    k = len(bns)

    def take(c, x, board):
        bns[c].take(x)
        board[i, "sums", c] = (bns[c].sums(), bns[c].M)
        return x

    def mean(board):
        parts = [board[i, "sums", c] for c in range(k)]
        M = sum(m for _, m in parts)
        board[i, "mean"] = (add_up(s for s, _ in parts) / M, M)

    def centre(c, x, board):
        board[i, "squares", c] = bns[c].centre(board[i, "mean"][0])
        return x

    def variance(board):
        mean, M = board[i, "mean"]
        board[i, "var"] = add_up(board[i, "squares", c] for c in range(k)) / M
        bns[0].track(mean, board[i, "var"], M)                # once per batch, in the main process

    return [("each", take), ("all", mean), ("each", centre), ("all", variance),
            ("each", lambda c, x, board: bns[c].normalise(board[i, "var"]))]


def batch_norm_backward_steps(i, bns, need_dx):
    """The backward of batch_norm_forward_steps: every slice's dx uses the batch's dbeta and
    dgamma; each slice writes its own share as its gradients (the network adds them up)."""
    k = len(bns)

    def parts(c, d, board):
        board[i, "grads", c] = bns[c].grad_parts(d) + (bns[c].M,)
        return d

    def totals(board):
        parts = [board[i, "grads", c] for c in range(k)]
        board[i, "totals"] = (add_up(p[0] for p in parts), add_up(p[1] for p in parts), sum(p[2] for p in parts))

    def dx(c, d, board):
        dbeta, dgamma, M = board[i, "totals"]
        return bns[c].input_grad(dbeta, dgamma, M) if need_dx else None

    return [("each", parts), ("all", totals), ("each", dx)]


def dropout_forward_steps(i, drops):
    """Dropout over a batch in slices: the mask is drawn for the whole batch at once by the
    main process, as the chapter draws it (the same numbers from the same generator), then cut."""
    k = len(drops)

    def note_shape(c, x, board):
        board[i, "shape", c] = (x.shape, x.dtype)
        return x

    def draw(board):
        shapes = [board[i, "shape", c][0] for c in range(k)]
        whole = (sum(s[0] for s in shapes),) + shapes[0][1:]
        mask = drops[0].forward(np.ones(whole, board[i, "shape", 0][1]), True)      # ones * mask
        start = 0
        for c, shape in enumerate(shapes):
            board[i, "mask", c] = mask[start:start + shape[0]] if drops[0].active else None
            start += shape[0]

    def apply(c, x, board):
        drop = drops[c]
        drop.mask = board[i, "mask", c]
        drop.active = drop.mask is not None
        return x * drop.mask if drop.active else x

    return [("each", note_shape), ("all", draw), ("each", apply)]


def view_of(view, vector, other):
    """The view of `other` (a flat vector) that `view` is of `vector`: the same place and shape."""
    start = (view.ctypes.data - vector.ctypes.data) // view.itemsize
    return other[start:start + view.size].reshape(view.shape)


def copy_for_slice(layer, net_grad, grad):
    """A copy of `layer` for another slice of the batch: the same parameters (and running
    statistics, generator), work arrays of its own, gradients written into `grad` where the
    layer's own go into `net_grad`."""
    twin = copy.copy(layer)
    twin.ws = {}
    twin.grads = {name: view_of(g, net_grad, grad) for name, g in layer.grads.items()}
    return twin


class FastNetwork(chapter.Network):
    """chapter.Network built from the fast layers, run in the order agree_on_pool_order
    chose, every batch cut into two slices (the section Slices), the second run by a worker process
    where two_processes.why_one_process() finds that safe (self.team), else here.  Same
    parameters, state names and flat vectors as the chapter's."""
    layer_types = FAST_TYPES
    run_steps = staticmethod(run_steps)         # for the worker (two_processes.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for layer, shape in zip(self.layers, self.shapes):        # an even map can be cut in 2x2 windows
            layer.out_even = len(shape) == 3 and shape[1] % 2 == 0 and shape[2] % 2 == 0
        self.run_order = agree_on_pool_order(self.layers)
        self.learns_below = [any(l.shapes for l in self.run_order[:i]) for i in range(len(self.run_order))]
        self.cut_into_slices([self.grad] + [np.zeros_like(self.grad) for _ in range(1, SLICES)])
        self.trained, self.optimizer = True, None                  # optimizer: set by adopt()
        self.one_process_why = "two_processes.py is not here" if two_processes is None else \
            two_processes.why_one_process()
        self.team = two_processes.Team(self) if self.one_process_why is None else None

    def cut_into_slices(self, slice_grads):
        """Slice 0 runs self.run_order itself and writes self.grad (slice_grads[0]); every other
        slice has copies of the layers writing their gradients into its own vector."""
        self.slice_grads = slice_grads
        self.slices = [self.run_order] + [[copy_for_slice(layer, self.grad, g) for layer in self.run_order]
                                          for g in slice_grads[1:]]

    def adopt(self, opt):
        """Take `opt` as this network's optimizer (its worker then updates half the parameters)."""
        opt.net, self.optimizer = self, opt
        if self.team is not None:
            self.team.adopt(opt)

    def forward_steps(self, train, k):
        steps = []
        for i, layer in enumerate(self.run_order):
            mine = [layers[i] for layers in self.slices[:k]]      # layer i of every slice
            if train and k > 1 and isinstance(layer, FastBatchNorm):
                steps += batch_norm_forward_steps(i, mine)
            elif train and k > 1 and isinstance(layer, chapter.Dropout):
                steps += dropout_forward_steps(i, mine)
            else:
                steps.append(("each", lambda c, x, board, mine=mine: mine[c].forward(x, train)))
        return steps

    def backward_steps(self, input_grad, k):
        steps = []
        for i in reversed(range(len(self.run_order))):
            need = input_grad or self.learns_below[i]
            mine = [layers[i] for layers in self.slices[:k]]
            if self.trained and k > 1 and isinstance(self.run_order[i], FastBatchNorm):
                steps += batch_norm_backward_steps(i, mine, need)
            else:
                steps.append(("each", lambda c, d, board, mine=mine, need=need:
                              None if d is None else mine[c].backward(d, need_dx=need)))
        return steps

    def forward(self, x, train=True):
        self.bounds = slice_bounds(len(x))
        self.trained = train
        xs = [x[a:b] for a, b in self.bounds]
        steps = self.forward_steps(train, len(xs))
        if not (len(xs) == 2 and self.team is not None and self.team.forward(steps, xs, train)):
            run_steps(steps, xs, {}, range(len(xs)))
        # the last layer's outputs are work arrays: the caller gets its own
        return np.concatenate(xs) if len(xs) > 1 else xs[0].copy()

    def backward(self, dlogits, input_grad=False):
        ds = [dlogits[a:b] for a, b in self.bounds]
        steps = self.backward_steps(input_grad, len(ds))
        if not (self.team is not None and self.team.backward(steps, ds, input_grad)):
            run_steps(steps, ds, {}, range(len(ds)))
        for g in self.slice_grads[1:len(ds)]:                    # in slice order: the same sum every run
            self.grad += g
        if not input_grad or ds[0] is None:
            return None
        return np.concatenate(ds) if len(ds) > 1 else ds[0].copy()     # work arrays: the caller's own copy


def flush_subnormals(a, scratch, tiny):
    """Set to 0 the values of `a` smaller than its type's smallest normal number (1.2e-38 in
    float32).  A moment whose gradient stays 0 (the weights of a dead unit, of an input that
    is always 0) shrinks by beta1 or mu every step and, after some 800 steps, lies below that:
    every operation on such "subnormal" numbers is some 30x slower on this machine's CPU (a
    pass over the seed network's parameters, a quarter of them subnormal: 21 -> 750 us), and
    the seed network's third epoch took 2.0 s instead of 1.5.  The step it would take is
    below 1e-33, far below what a float32 weight of normal size can hold: the weights do
    not change.  (scratch, tiny: work arrays of a's shape, float and bool.)"""
    np.abs(a, out=scratch)
    np.less(scratch, np.finfo(a.dtype).tiny, out=tiny)
    np.copyto(a, 0, where=tiny)


def whole_or_halves(opt, g, lr_scale, t):
    """opt.update_part on every parameter here, or half here and half in the worker of the
    network that adopted opt (two_processes.Team.update_in_halves); the step it wrote."""
    team = opt.net.team if opt.net is not None else None
    if team is None or not team.update_in_halves(opt, g, lr_scale, t):
        opt.update_part(g, lr_scale, t, slice(None))
    return opt.step


class FastAdam(chapter.Adam):
    """chapter.Adam in place; the second half of the parameters updated by the network's
    worker, when it is at work (two_processes.Team.update_in_halves)."""
    net = None                                 # the FastNetwork it updates, set by make_optimizer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tmp = np.empty_like(self.m)
        self._tiny = np.empty(self.m.shape, bool)

    def update(self, g, lr_scale=1.0):
        """The change to add to the parameters for gradient g."""
        self.t += 1
        return whole_or_halves(self, g, lr_scale, self.t)

    def update_part(self, g, lr_scale, t, part):
        """update() on the parameters in `part` (a slice): every operation is elementwise."""
        b1, b2 = self.beta1, self.beta2
        m, v, tmp, g = self.m[part], self.v[part], self._tmp[part], g[part]
        # Every line below is one pass over all the parameters, written into kept arrays
        # (out=, in place): a temporary array per operation would cost as much again.
        # 1) m = b1*m + (1-b1)*g
        m *= b1
        np.multiply(g, 1 - b1, out=tmp)
        m += tmp
        #    v = b2*v + (1-b2)*g^2
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - b2
        v += tmp
        flush_subnormals(m, tmp, self._tiny[part])
        # 2) step = -lr * m_hat / (sqrt(v_hat) + eps), with the bias corrections toward 0 of
        #    moments that started at 0: m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).
        #    The corrections are moved onto the scalars, as in the Adam paper's faster
        #    ordering, but with eps scaled too, so the step is exactly the same, in fewer
        #    passes: sqrt(v_hat) + eps = (sqrt(v) + eps*c) / c with c = sqrt(1 - b2^t).
        c = math.sqrt(1 - b2 ** t)
        np.sqrt(v, out=tmp)
        tmp += self.eps * c
        np.divide(m, tmp, out=tmp)
        tmp *= -self.lr * lr_scale * c / (1 - b1 ** t)
        return tmp

    @property
    def step(self):
        return self._tmp

    def shared_state(self):
        """The arrays that change at every step (moved to shared memory by two_processes.Team.adopt)."""
        return ["m", "v", "_tmp"]


class FastAdamW(FastAdam):
    """chapter.AdamW on FastAdam."""

    def __init__(self, params_flat, decay_mask, lr=chapter.ADAM_LR, weight_decay=chapter.WEIGHT_DECAY,
                 dtype=np.float32):
        super().__init__(params_flat.size, lr, dtype=dtype)
        self.params = params_flat
        self.decay = decay_mask.astype(dtype) * weight_decay

    def update_part(self, g, lr_scale, t, part):
        step = super().update_part(g, lr_scale, t, part)
        step -= (self.lr * lr_scale) * self.decay[part] * self.params[part]          # 4)
        return step


class FastMomentum(chapter.Momentum):
    """chapter.Momentum in place (its halves as FastAdam's)."""
    net = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tmp = np.empty_like(self.velocity)
        self._tiny = np.empty(self.velocity.shape, bool)

    def update(self, g, lr_scale=1.0):
        return whole_or_halves(self, g, lr_scale, 0)

    def update_part(self, g, lr_scale, t, part):
        velocity = self.velocity[part]
        velocity *= self.mu                       # 1) velocity = mu*velocity + g
        velocity += g[part]
        flush_subnormals(velocity, self._tmp[part], self._tiny[part])
        return np.multiply(velocity, -self.lr * lr_scale, out=self._tmp[part])  # 2)

    @property
    def step(self):
        return self._tmp

    def shared_state(self):
        return ["velocity", "_tmp"]


class FastDual(chapter.Dual):
    """chapter.Dual on the in-place parts (its halves as FastAdam's)."""
    net = None

    def __init__(self, size, adam_lr=chapter.ADAM_LR, sgd_lr=chapter.SGD_LR, momentum=chapter.MOMENTUM,
                 dtype=np.float32):
        self.adam = FastAdam(size, adam_lr, dtype=dtype)
        self.momentum = FastMomentum(size, sgd_lr, momentum, dtype=dtype)

    def update(self, g, lr_scale=1.0):
        self.adam.t += 1
        return whole_or_halves(self, g, lr_scale, self.adam.t)

    def update_part(self, g, lr_scale, t, part):
        step = self.adam.update_part(g, lr_scale, t, part)
        step += self.momentum.update_part(g, lr_scale, t, part)
        return step

    @property
    def step(self):
        return self.adam._tmp

    def shared_state(self):
        return [f"adam.{name}" for name in self.adam.shared_state()] + \
            [f"momentum.{name}" for name in self.momentum.shared_state()]


FAST_OPTIMIZERS = {"dual": FastDual, "adam": FastAdam, "adamw": FastAdamW, "momentum": FastMomentum}


def make_optimizer(name, net, *args, **kwargs):
    """chapter.make_optimizer with the in-place optimizers; a FastNetwork adopts it (its
    worker then updates half of the parameters)."""
    opt = chapter.make_optimizer(name, net, *args, kinds=FAST_OPTIMIZERS, **kwargs)
    if isinstance(net, FastNetwork):
        net.adopt(opt)
    return opt


def processes_in_words(batch_size, serving=False):
    """Where the fast path will run batches of batch_size, for the run's first line: "two
    processes", or "one process (why)" (two_processes.why_one_process)."""
    why = "two_processes.py is not here" if two_processes is None else \
        two_processes.why_one_process(batch_size, serving)
    return "two processes" if why is None else f"one process ({why})"


def differs_from_chapter(spec, optimizer="dual", seed=0, batch=4, tolerance=1e-6):
    """None if the fast path and the chapter compute the same numbers for this network on one
    small float64 batch: the logits in training and in evaluation, the loss, every parameter
    gradient, the input gradient and two optimizer steps.  Else what differs first, in words.

    Both networks start from the same seed, so they hold the same weights and draw the same
    dropout masks.  A few milliseconds, even for the deep network."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch,) + chapter.INPUT_SHAPE)
    y = rng.integers(0, chapter.CLASSES, batch)
    results = []
    for network, maker in ((chapter.Network, chapter.make_optimizer), (FastNetwork, make_optimizer)):
        try:
            net = network(spec, np.random.default_rng(seed), dtype=np.float64)
            logits = net.forward(x, train=True)
            loss, dlogits = chapter.softmax_cross_entropy(logits, y)
            dx = net.backward(dlogits, input_grad=True)
            grad = net.grad.copy()
            opt = maker(optimizer, net)
            steps = [np.array(opt.update(grad)) for _ in range(2)]
            results.append({"the output differs": logits, "the loss differs": np.array(loss),
                            "the input gradient differs": np.array(dx), **{f"{k}'s gradient differs": g.copy()
                                                                    for k, g in net.grads.items()},
                            f"the {optimizer} steps differ": np.stack(steps),
                            "the evaluation output differs": net.forward(x, train=False)})
        except Exception as e:          # a learner's broken layer is reported by their own run
            if network is chapter.Network:
                raise
            return f"the fast path failed with {type(e).__name__}"
    plain, fast = results
    for what, a in plain.items():
        b = fast[what]
        # relative, with a floor for a gradient that is truly 0 (a conv bias right before batch
        # norm, which the normalisation cancels): there both sides are rounding noise
        if a.shape != b.shape or not np.all(np.isfinite(b)) or \
                np.linalg.norm(a - b) > tolerance * max(np.linalg.norm(a), 1e-3):
            return what
    return None
