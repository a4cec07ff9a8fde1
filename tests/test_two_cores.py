"""The fast path on two cores (fast_layers.py, "Two cores"): every batch is cut into two fixed
slices, each through its own copy of the layers, the second run by a forked worker process
from WORKER_FROM images on.  The numbers must be the chapter's (float64, within 1e-9) and must
not depend on where slice 1 ran (float32, byte for byte): logits, loss, every gradient, the
input gradient, batch norm's running statistics, dropout's masks, and the optimizers' steps,
half of which the worker computes.  An error in the worker is raised in the main process, a
dropped network stops its worker, and small batches never start one.

Where slice 1 runs is a race (the main process takes a batch back if the worker has not
claimed it in time, and stops offering batches when the machine looks busy).  The tests that
need the worker to run it say so with worker_takes_every_slice, which only makes the main
process wait for the worker's claim: it changes where slice 1 runs, never a number."""
import contextlib
import gc
import os
import signal
import time

import numpy as np
import pytest

import fast_layers as fl
import two_processes as tp
import mnist_net as m
from reference import assert_gradients_equal

NET_RTOL = 1e-9     # a whole network, float64 (as in test_fast_path.py)
WAIT = 10.0         # seconds the main process waits for the worker's claim before running slice 1 itself
IN_PROCESS = 10 ** 9    # net.team.skip: this many forwards run both slices in the main process

# These tests are about the two processes themselves: where two_processes.py finds them unsafe
# (another platform, CPU or BLAS) they cannot run; tests/test_platforms.py covers that case.
pytestmark = pytest.mark.skipif(tp.why_one_process(facts=dict(tp.platform_facts(), threads=1)) is not None,
                                reason=f"one process here: {tp.why_one_process(facts=dict(tp.platform_facts(), threads=1))}")


@pytest.fixture(autouse=True)
def no_other_threads(monkeypatch):
    """A thread another test left behind (the page's server tests) would make every network here
    run in one process: these tests play a process with none."""
    real = tp.platform_facts
    monkeypatch.setattr(tp, "platform_facts", lambda: dict(real(), threads=1))


# =====================================================================================
# Helpers
# =====================================================================================
@pytest.fixture
def networks():
    """make(spec, seed=0, dtype=float64) -> a FastNetwork; after the test every network made
    is dropped, which stops its worker (test_a_dropped_network_stops_its_worker), and a worker
    still running then (a failed test's traceback keeps its network) is stopped."""
    made = []

    def make(spec, seed=0, dtype=np.float64):
        net = fl.FastNetwork(spec, np.random.default_rng(seed), dtype=dtype)
        made.append(net)
        return net

    yield make
    workers = [net.team.worker for net in made if net.team.worker is not None]     # no reference to the networks
    made.clear()
    gc.collect()
    for worker in workers:                    # its network still referred to (a failed test's traceback)
        if worker.process.is_alive():
            worker.close()


@pytest.fixture(autouse=True)
def collect_garbage_between_tests():
    """Dropped networks collected before and after each test, while no other test's worker
    runs: a network and its optimizer form a cycle that only the garbage collector frees, at
    any later moment (each test then starts with only its own workers alive)."""
    gc.collect()
    yield
    gc.collect()


def make_worker_win(net):
    """Make net's worker (already forked) run slice 1 of every batch offered to it: before the
    main process claims a forward for itself, it waits up to WAIT s for the worker's claim;
    and it is never judged too busy to offer the next batch.  First it waits for the worker to
    read what it was last sent: an offer the main process took back and the worker has not
    seen yet (a busy machine) would keep the next offer from being sent."""
    worker = net.team.worker
    sent = worker.channel.head[0]                    # main -> worker: (count, length, read, ...)
    give_up = time.monotonic() + WAIT
    while sent[2] < sent[0] and time.monotonic() < give_up:
        time.sleep(0.0002)
    real_claim = worker.claim               # the worker's own copy (forked earlier) is unchanged

    def claim(offer):
        give_up = time.monotonic() + WAIT
        while worker.claimed[0] < offer and time.monotonic() < give_up:
            time.sleep(0.0002)
        return real_claim(offer)

    worker.claim = claim
    net.team.judge_worker = lambda: None
    net.team.skip = 0
    return worker


def worker_takes_every_slice(net):
    """Fork net's worker now, as its first offered forward would, and make it run slice 1 of
    every batch (make_worker_win).  Fork after making the optimizer: adopting one closes it."""
    assert net.team.worker is None
    net.team.worker = tp.Worker(net)
    return make_worker_win(net)


def move_batch_norm_off_the_identity(net, seed):
    """gamma, beta and the running statistics of every batch norm set to values away from
    1 and 0 (the same for every network of the same seed), so that a mix-up shows."""
    rng = np.random.default_rng(seed + 100)
    for name, value in net.state.items():
        if name.startswith("bn") and not name.endswith("num_batches_tracked"):
            value[...] = rng.uniform(0.5, 1.5, value.shape) if name.endswith(("weight", "running_var")) \
                else rng.standard_normal(value.shape) * 0.3


def chapter_and_fast(spec, make, seed=0):
    """(chapter Network, FastNetwork) in float64 from the same seed: the same weights (and the
    same generator for dropout), batch norm moved off the identity alike."""
    chapter, fast = m.Network(spec, np.random.default_rng(seed), dtype=np.float64), make(spec, seed)
    for net in (chapter, fast):
        move_batch_norm_off_the_identity(net, seed)
    np.testing.assert_array_equal(fast.flat, chapter.flat)
    return chapter, fast


def assert_close(fast, chapter, what, rtol=NET_RTOL):
    fast, chapter = np.asarray(fast), np.asarray(chapter)
    assert fast.shape == chapter.shape, what
    scale = max(np.abs(chapter).max(initial=0.0), 1.0)
    np.testing.assert_allclose(fast, chapter, rtol=rtol, atol=rtol * scale, err_msg=what)


def zero_gradient_names(net):
    """The gradients that are 0 but for rounding: a conv's or dense layer's bias right before
    batch norm (the normalisation subtracts its mean)."""
    names = {id(layer): prefix for prefix, layer in net.named}
    return {f"{names[id(a)]}.bias" for a, b in zip(net.layers, net.layers[1:])
            if a.kind in ("conv", "fc") and b.kind == "bn"}


def assert_gradients_close(fast, chapter):
    """Every entry of net.grads within NET_RTOL; the ones that are 0 but for rounding compared
    absolutely."""
    assert_gradients_equal(fast, chapter, zero_gradient_names(chapter), NET_RTOL)


def batch(n, seed, dtype=np.float64):
    data = np.random.default_rng(seed)
    return data.standard_normal((n, 1, 28, 28)).astype(dtype), data.integers(0, 10, n)


@contextlib.contextmanager
def deadline(seconds):
    """A TimeoutError if the block takes longer than `seconds`: a hang fails the test."""
    def give_up(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# =====================================================================================
# Slices
# =====================================================================================
@pytest.mark.parametrize("n", [1, 2, 3, 16, 33, 128])
def test_slice_bounds_cut_a_batch_into_at_most_two_runs_that_cover_it(n):
    """Each item of the batch in exactly one slice, the slices runs of consecutive items in
    order, two of them (one for a single image), their sizes at most 1 apart, the same cut
    every time."""
    bounds = fl.slice_bounds(n)
    assert len(bounds) == min(fl.SLICES, n) == min(2, n)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    assert all(b > a for a, b in bounds)
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    assert fl.slice_bounds(n) == bounds
    if n == 33:
        assert bounds == [(0, 16), (16, 33)]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 15])
def test_small_batches_never_start_a_worker(networks, n):
    """Below WORKER_FROM (16) images both slices run in the main process: no fork for a
    training step, an input gradient or an evaluation; 16 images do start one."""
    assert tp.WORKER_FROM == 16
    net = networks("deep", dtype=np.float32)
    x, y = batch(n, 1, np.float32)
    for _ in range(2):
        _, dlogits = m.softmax_cross_entropy(net.forward(x, train=True), y)
        net.backward(dlogits, input_grad=True)
        net.forward(x, train=False)
        assert net.team.worker is None and not net.team.on_worker
        assert net.bounds == fl.slice_bounds(n)
    net.forward(batch(16, 2, np.float32)[0])
    assert net.team.worker is not None and net.team.worker.process.is_alive()


def test_worker_from_set_huge_never_starts_a_worker(networks, monkeypatch):
    """fast_layers.WORKER_FROM decides: set above the batch, a batch of 64 runs in two slices
    in the main process, and gives the same logits as one that the worker shares."""
    monkeypatch.setattr(tp, "WORKER_FROM", 10 ** 9)
    here, shared = networks("seed", dtype=np.float32), networks("seed", dtype=np.float32)
    x, _ = batch(64, 3, np.float32)
    logits = here.forward(x)
    assert here.team.worker is None and not here.team.on_worker and len(here.bounds) == 2
    monkeypatch.setattr(tp, "WORKER_FROM", 16)
    worker_takes_every_slice(shared)
    np.testing.assert_array_equal(shared.forward(x), logits)
    assert shared.team.on_worker


# =====================================================================================
# The worker's numbers are the chapter's (float64)
# =====================================================================================
TWO_CORE_SPECS = [
    ("seed", 32),
    ("deep", 32),
    ("conv5 relu pool fc10", 32),                           # 26 -> 13: an odd map after the pool
    ("conv4x4 relu pool fc10", 32),                         # 25: an odd conv output, plain layout
    ("conv4p2 relu pool fc10", 32),                         # padding: 30 -> 15
    ("conv6x5 relu pool conv8x5 relu pool fc10", 32),       # 5x5 kernels: 24 -> 12 -> 8 -> 4
    ("conv4 relu pool fc16 bn relu fc10", 32),              # batch norm after a dense layer
    ("conv4p1 relu pool dropout0.3 fc16 relu fc10", 32),    # dropout: the chapter's masks
    ("seed", 33),                                           # slices of 16 and 17
    ("deep", 33),
    ("conv4p1 bn relu pool dropout0.3 fc16 bn relu fc10", 33),
]


@pytest.mark.parametrize("spec, n", TWO_CORE_SPECS)
def test_the_worker_computes_the_chapters_numbers(networks, spec, n):
    """Same seed, float64, slice 1 run by the worker: the training logits, the loss, every
    parameter gradient, the input gradient and the running statistics are the chapter's
    network's within 1e-9; after the same step on both, so are the evaluation logits (the
    worker sees the new parameters and running statistics)."""
    chapter, fast = chapter_and_fast(spec, networks)
    worker_takes_every_slice(fast)
    x, y = batch(n, 5)
    results = []
    for net in (chapter, fast):
        logits = net.forward(x, train=True)
        if net is fast:
            assert fast.team.on_worker and fast.bounds == fl.slice_bounds(n) and len(fast.bounds) == 2
        loss, dlogits = m.softmax_cross_entropy(logits, y)
        dx = np.array(net.backward(dlogits, input_grad=True))
        results.append((logits, loss, dx))
    (logits_c, loss_c, dx_c), (logits_f, loss_f, dx_f) = results
    assert loss_f == pytest.approx(loss_c, rel=NET_RTOL)
    assert_close(logits_f, logits_c, "training logits")
    assert_close(dx_f, dx_c, "input gradient")
    assert dx_f.shape == x.shape
    assert_gradients_close(fast, chapter)
    for name, value in chapter.state.items():
        assert_close(fast.state[name], value, name)
    step = -0.05 * chapter.grad
    for net in (chapter, fast):
        net.flat += step
    x, _ = batch(n, 6)
    logits_f = fast.forward(x, train=False)
    assert fast.team.on_worker
    assert_close(logits_f, chapter.forward(x, train=False), "evaluation logits")


@pytest.mark.parametrize("spec", ["deep", "conv4p1 bn relu pool fc16 bn relu fc10"])
def test_running_statistics_after_sliced_forwards_are_the_chapters(networks, spec):
    """Batch norm's running mean and variance after training forwards of batches in two
    slices (worker or not) and in one are the chapter's, within 1e-9, and num_batches_tracked
    counts each forward once, not once per slice; an evaluation forward changes nothing."""
    chapter, fast = chapter_and_fast(spec, networks)
    worker_takes_every_slice(fast)
    tracked = [name for name in chapter.state if name.endswith("num_batches_tracked")]
    assert len(tracked) == 2
    for count, (n, seed, on_worker) in enumerate([(32, 1, True), (33, 2, True), (8, 3, False),
                                                  (1, 4, False), (17, 5, True)], start=1):
        x, _ = batch(n, seed)
        chapter.forward(x, train=True)
        fast.forward(x, train=True)
        assert fast.team.on_worker == on_worker
        for name, value in chapter.state.items():
            assert_close(fast.state[name], value, name)
        for name in tracked:
            assert int(fast.state[name]) == int(chapter.state[name]) == count
    kept = {name: np.array(value) for name, value in fast.state.items()}
    fast.forward(batch(32, 9)[0], train=False)
    assert fast.team.on_worker
    for name, value in kept.items():
        np.testing.assert_array_equal(fast.state[name], value)


@pytest.mark.parametrize("optimizer", ["dual", "adam", "adamw", "momentum"])
@pytest.mark.parametrize("spec", ["seed", "deep"])
def test_differs_from_chapter_finds_nothing_with_the_worker(spec, optimizer):
    """The start-up check on the presets, with its batch of 4 (no worker) and of 32 (the
    worker may take slice 1 and half of the optimizer's steps)."""
    assert fl.differs_from_chapter(spec, optimizer) is None
    assert fl.differs_from_chapter(spec, optimizer, batch=32) is None


# =====================================================================================
# The worker's numbers are the main process's (float32, byte for byte)
# =====================================================================================
def train_step(net, opt, x, y, lr_scale=1.0):
    logits = net.forward(x, train=True)
    loss, dlogits = m.softmax_cross_entropy(logits, y)
    net.backward(dlogits)
    step = np.array(opt.update(net.grad, lr_scale))
    net.flat += step
    return logits, loss, step


def assert_same_step(a, b, outputs_a, outputs_b):
    """One training step of two networks (and their train_step outputs) exactly equal: the
    logits, the loss, the gradient, the optimizer's step, the parameters after it, and every
    running statistic."""
    (logits_a, loss_a, step_a), (logits_b, loss_b, step_b) = outputs_a, outputs_b
    np.testing.assert_array_equal(logits_a, logits_b)
    assert loss_a == loss_b
    np.testing.assert_array_equal(a.grad, b.grad)
    np.testing.assert_array_equal(step_a, step_b)
    np.testing.assert_array_equal(a.flat, b.flat)
    for name, value in b.state.items():
        np.testing.assert_array_equal(a.state[name], value, err_msg=name)


@pytest.mark.parametrize("spec, n", [("deep", 64), ("seed", 128),
                                     ("conv4p1 bn relu pool dropout0.3 fc16 bn relu fc10", 33)])
def test_worker_and_main_process_give_the_same_bytes(networks, spec, n):
    """Two networks from the same seed, float32, the dual optimizer: one runs every batch in
    the main process, the other gives slice 1 (and half of every optimizer step) to the
    worker.  After each of 3 training steps the logits, loss, gradients, parameters and
    running statistics are exactly equal."""
    here, shared = networks(spec, dtype=np.float32), networks(spec, dtype=np.float32)
    here.team.skip = IN_PROCESS
    optimizers = fl.make_optimizer("dual", here), fl.make_optimizer("dual", shared)
    worker_takes_every_slice(shared)
    for step in range(3):
        x, y = batch(n, 10 + step, np.float32)
        outputs_h = train_step(here, optimizers[0], x, y, m.cosine_scale(step, 3))
        outputs_s = train_step(shared, optimizers[1], x, y, m.cosine_scale(step, 3))
        assert shared.team.on_worker and not here.team.on_worker and here.team.worker is None
        assert_same_step(shared, here, outputs_s, outputs_h)
    assert not np.array_equal(here.flat, networks(spec, dtype=np.float32).flat)     # it trained
    x, _ = batch(n, 20, np.float32)
    np.testing.assert_array_equal(shared.forward(x, train=False), here.forward(x, train=False))
    assert shared.team.on_worker


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "momentum", "dual"])
def test_the_worker_updates_half_of_the_parameters_exactly(networks, optimizer):
    """After a batch the worker took, opt.update runs half of the parameter vector in the
    worker (update_in_halves says True): the step, the parameters after it and the
    optimizer's moments are exactly those of the same optimizer run all in the main process,
    over 4 steps with a falling lr_scale."""
    spec = "conv4 bn relu pool fc16 relu fc10"
    here, shared = networks(spec, dtype=np.float32), networks(spec, dtype=np.float32)
    here.team.skip = IN_PROCESS
    optimizers = [fl.make_optimizer(optimizer, net, weight_decay=0.1) for net in (here, shared)]
    assert all(opt.net is net and net.optimizer is opt for opt, net in zip(optimizers, (here, shared)))
    worker_takes_every_slice(shared)
    halves = {}
    for name, net in (("here", here), ("shared", shared)):
        def recorded(opt, g, lr_scale, t, real=net.team.update_in_halves, name=name):
            halves.setdefault(name, []).append(real(opt, g, lr_scale, t))
            return halves[name][-1]
        net.team.update_in_halves = recorded
    for step in range(4):
        x, y = batch(32, 30 + step, np.float32)
        _, _, step_h = train_step(here, optimizers[0], x, y, m.cosine_scale(step, 4))
        _, _, step_s = train_step(shared, optimizers[1], x, y, m.cosine_scale(step, 4))
        half = shared.flat.size // 2
        assert np.any(step_s[half:] != 0) and np.any(step_s[:half] != 0)
        np.testing.assert_array_equal(step_s, step_h)
        np.testing.assert_array_equal(shared.flat, here.flat)
        for path in optimizers[0].shared_state():
            arrays = []
            for opt in optimizers:
                owner = opt
                for attr in path.split("."):
                    owner = getattr(owner, attr)
                arrays.append(owner)
            np.testing.assert_array_equal(arrays[1], arrays[0], err_msg=path)
    assert halves == {"here": [False] * 4, "shared": [True] * 4}
    for net in (here, shared):
        del net.team.update_in_halves                                  # the cycle net -> recorded -> net


# =====================================================================================
# The worker's life: errors, and a dropped network
# =====================================================================================
def broken(*args, **kwargs):
    raise ValueError("a planted bug in slice 1")


@pytest.mark.parametrize("spec, where, method", [
    ("seed", -1, "forward"),        # the last dense layer: the main process waits for the logits
    ("deep", 0, "forward"),         # the first conv: the main process waits at batch norm's sums
    ("seed", -1, "backward"),       # the forward goes well, the backward fails
])
def test_an_error_in_the_worker_is_raised_in_the_main_process(networks, spec, where, method):
    """A layer of slice 1's copy broken before the worker is forked (the worker inherits it;
    the main process runs slice 0 only): the forward or backward raises RuntimeError naming
    the worker and the error, at once, not a hang; the worker is stopped and dropped.  With the
    layer mended, the next forward forks a new worker and gives the right numbers."""
    net = networks(spec, dtype=np.float32)
    reference = networks(spec, dtype=np.float32)
    reference.team.skip = IN_PROCESS
    layer = net.slices[1][where]
    assert layer is not net.slices[0][where]
    setattr(layer, method, broken)
    worker = worker_takes_every_slice(net)
    x, y = batch(32, 40, np.float32)
    with deadline(15):
        with pytest.raises(RuntimeError, match="worker") as error:
            _, dlogits = m.softmax_cross_entropy(net.forward(x), y)
            assert method == "backward" and net.team.on_worker
            net.backward(dlogits)
    assert "ValueError" in str(error.value) and "a planted bug in slice 1" in str(error.value)
    assert net.team.worker is None and not worker.process.is_alive()
    delattr(layer, method)
    with deadline(15):
        net.forward(x)
        assert net.team.worker is not None and net.team.worker.process.is_alive()
        assert net.team.worker.process.pid != worker.process.pid
        make_worker_win(net)
        logits = net.forward(x)
        assert net.team.on_worker
        np.testing.assert_array_equal(logits, reference.forward(x))
        loss, dlogits = m.softmax_cross_entropy(logits, y)
        dx = net.backward(dlogits, input_grad=True)
        np.testing.assert_array_equal(dx, reference.backward(dlogits, input_grad=True))
        np.testing.assert_array_equal(net.grad, reference.grad)


@pytest.mark.parametrize("trained", [False, True], ids=["forward only", "with an optimizer"])
def test_a_dropped_network_stops_its_worker(trained):
    """del net (and a garbage collection, for the cycle a network and its adopted optimizer
    make): the worker process is gone within 2 s."""
    net = fl.FastNetwork("seed", np.random.default_rng(0))
    x, y = batch(32, 50, np.float32)
    if trained:
        opt = fl.make_optimizer("dual", net)
        m.loss_and_grads(net, x, y)
        net.flat += opt.update(net.grad)
        del opt
    else:
        net.forward(x)
    assert net.team.worker is not None
    process = net.team.worker.process
    assert process.is_alive()
    del net
    gc.collect()
    give_up = time.monotonic() + 2.0
    while process.is_alive() and time.monotonic() < give_up:
        time.sleep(0.01)
    alive = process.is_alive()
    if alive:                                   # do not leave it running after the tests
        process.terminate()
        process.join()
    assert not alive


# =====================================================================================
# Two bugs found while writing these tests, fixed
# =====================================================================================
def test_a_closed_worker_does_not_later_close_descriptors_it_no_longer_owns(tmp_path):
    """Worker.close() (by adopt(), after an error) runs the network's finalizer once: dropping
    the network later does not close the same numbers again, by then someone else's."""
    net = fl.FastNetwork("seed", np.random.default_rng(0))
    net.forward(batch(32, 60, np.float32)[0])
    old_fds = net.team.worker.fds
    fl.make_optimizer("dual", net)                       # adopt() closes the worker
    assert net.team.worker is None and not any(is_open(fd) for fd in old_fds)
    with open(tmp_path / "someone_else.txt", "w") as f:
        for fd in old_fds:                               # the numbers reused, as os.pipe/open do
            os.dup2(f.fileno(), fd)
        try:
            del net
            gc.collect()
            still_open = [fd for fd in old_fds if is_open(fd)]
        finally:
            for fd in old_fds:
                if is_open(fd):
                    os.close(fd)
    assert still_open == list(old_fds)


def test_a_batch_too_big_for_the_mailbox_still_runs(networks):
    """A batch whose second half's messages would not fit a mailbox (8 MiB) runs in the main
    process, with the same numbers; the next batch that fits goes to the worker again."""
    spec = "conv16p1 relu dropout0.5 pool fc10"
    net, reference = networks(spec, dtype=np.float32), networks(spec, dtype=np.float32)
    reference.team.skip = IN_PROCESS
    worker_takes_every_slice(net)
    x, _ = batch(400, 70, np.float32)
    np.testing.assert_array_equal(net.forward(x), reference.forward(x))
    assert not net.team.on_worker             # slice 1's dropout mask (10 MB) would not fit a mailbox: run here
    small, _ = batch(64, 71, np.float32)
    np.testing.assert_array_equal(net.forward(small), reference.forward(small))
    assert net.team.on_worker
