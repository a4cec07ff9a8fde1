"""What a learner sees on another platform, and when the worker process dies (issue 19, item 7).

two_processes.py runs slice 1 of every batch in a forked worker only where it finds that safe;
everywhere else, and when the worker cannot start or dies, the fast path goes on in one process
with the same numbers.  These tests hold it to that from the outside and the inside:

1. tools/as_platform.py plays each other machine (its pieces taken away in the real program):
   the run ends well, its first line names the one-process reason that why_one_process gives
   for that machine's facts, and its predictions log is byte for byte the normal run's.
2. The worker of a real run killed with SIGKILL in its first epoch: the run ends with the
   unkilled run's log and one note, or (killed in an optimizer update) in one error line.
3. The worker killed at fixed points in this process: in a forward, a backward (redone here,
   the same numbers as a network that never had a worker), an optimizer update (WorkerLost),
   and from outside while it waits between the parts of a step.
4. why_one_process on its own, for a table of facts.

Two bugs found while writing them are fixed and checked here: a worker killed while it slept
waiting for the main process's next message stopped the run with BrokenPipeError (on the command
line: exit 1 and nothing said), and the scheduler's backoff doubled twice per retry, not once.

The subprocess tests run the program as a learner does (python3 ... from the project folder,
nothing of the tests on the import path); the in-process ones use test_two_cores.py's helpers."""
import gc
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import fast_layers as fl
import mnist_net as m
import two_processes as tp
from conftest import ROOT, write_mnist
from test_two_cores import IN_PROCESS, assert_same_step, batch, deadline, train_step, worker_takes_every_slice
from tools import as_platform

# Two processes on this machine, for a process with no other thread (pytest's may have some)?
WHY_NOT_TWO = tp.why_one_process(m.BATCH_SIZE, facts=dict(tp.platform_facts(), threads=1))
needs_two = pytest.mark.skipif(WHY_NOT_TWO is not None, reason=f"one process here: {WHY_NOT_TWO}")

FIRST_LINE = "layers: the fast path (fast_layers.py), "
BN_DROPOUT = "conv4p1 bn relu pool dropout0.3 fc16 bn relu fc10"
RUN_TIMEOUT = 120           # seconds any one run of the program may take before the test fails

# What each play of tools/as_platform.py says about the machine it plays, as platform_facts()
# would read it there (None: the play overrules the decision itself).
PLAY_FACTS = {
    "windows": {"system": "win32", "start_methods": ["spawn"], "fork": False},
    "macos": {"system": "darwin"},
    "arm": {"machine": "aarch64"},
    "mkl": {"blas": ("mkl",)},
    "no-threadpoolctl": {"blas": None},
    "threads": {"threads": 2},
    "no-worker": {},                 # this machine's facts; only the fork fails
    "one-process": None,
}


@pytest.fixture(autouse=True)
def no_other_threads(monkeypatch):
    """As in test_two_cores.py: a thread another test left behind would make every network built
    here run in one process."""
    real = tp.platform_facts
    monkeypatch.setattr(tp, "platform_facts", lambda: dict(real(), threads=1))


@pytest.fixture(autouse=True)
def collect_garbage_between_tests():
    """Dropped networks (and their workers) collected before and after each test."""
    gc.collect()
    yield
    gc.collect()


@pytest.fixture
def networks():
    """make(spec, dtype=float32) -> a FastNetwork from seed 0; after the test every network made
    is dropped, and a worker still alive then (a failed test's traceback) stopped."""
    made = []

    def make(spec, dtype=np.float32):
        net = fl.FastNetwork(spec, np.random.default_rng(0), dtype=dtype)
        made.append(net)
        return net

    yield make
    workers = [net.team.worker for net in made if net.team is not None and net.team.worker is not None]
    made.clear()
    gc.collect()
    for worker in workers:
        if worker.process.is_alive():
            worker.close()


# =====================================================================================
# Running the program as a learner does
# =====================================================================================
def clean_env():
    """The environment of a user's shell: nothing of this project on the import path
    (as test_chapter_alone.py)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}


def command(data_dir, log_file, play=None):
    """python mnist_net.py, or python -m tools.as_platform PLAY, with the same flags (one epoch)."""
    start = [sys.executable, "mnist_net.py"] if play is None else [sys.executable, "-m", "tools.as_platform", play]
    return start + ["--epochs", "1", "--data-dir", str(data_dir), "--log-file", str(log_file),
                    "--no-download"]


def run(*args, **kwargs):
    return subprocess.run(command(*args, **kwargs), cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def layers_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("layers: ")]
    assert len(lines) == 1, stdout
    assert stdout.startswith(lines[0]), "the layers line is not the first: " + stdout
    return lines[0]


def assert_no_traceback(texts):
    for text in texts:
        assert "Traceback" not in text, text


def test_the_flags_these_tests_pass_exist():
    """--epochs, --data-dir, --log-file and --no-download are in the program's --help (else the
    runs below would test an argparse error)."""
    result = subprocess.run([sys.executable, "mnist_net.py", "--help"], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    for flag in ("--epochs", "--data-dir", "--log-file", "--no-download"):
        assert flag in result.stdout


# =====================================================================================
# 1. Each play of tools/as_platform.py
# =====================================================================================
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """1,000 training images (8 steps of 128: the worker's from 16) and 200 test images."""
    folder = tmp_path_factory.mktemp("platforms") / "data"
    write_mnist(str(folder), n_train=1000, n_test=200)
    return folder


@pytest.fixture(scope="module")
def normal_run(small_data, tmp_path_factory):
    """The same run without a play, once: (result, the log's bytes)."""
    log = tmp_path_factory.mktemp("normal") / "log.txt"
    result = run(small_data, log)
    assert result.returncode == 0, result.stderr
    return result, log.read_bytes()


def expected_reason(play, monkeypatch):
    """The reason the play's first line must give: why_one_process on this machine's facts with
    the play's changed, or, for one-process, what the play makes why_one_process say
    (played here, and undone after the test by monkeypatch)."""
    changes = PLAY_FACTS[play]                          # KeyError: a new play without a test
    if changes is None:
        monkeypatch.setattr(tp, "why_one_process", tp.why_one_process)      # restored after the test
        as_platform.play(play)
        return tp.why_one_process(m.BATCH_SIZE)
    return tp.why_one_process(m.BATCH_SIZE, facts={**tp.platform_facts(), "threads": 1, **changes})


@pytest.mark.parametrize("play", as_platform.PLAYS)
def test_each_play_runs_in_one_process_saying_why_with_the_same_log(play, small_data, normal_run, tmp_path,
                                                                    monkeypatch):
    """python -m tools.as_platform PLAY --epochs 1 ...: exit 0, no traceback, the first line
    "layers: the fast path (fast_layers.py), one process (REASON)" with the reason
    why_one_process gives for that machine's facts, nothing on stderr (no-worker: the first line
    says two processes, and stderr is one note that the worker could not start), and the
    predictions log byte for byte that of the same run without a play, in two processes."""
    result = run(small_data, tmp_path / "log.txt", play=play)
    assert result.returncode == 0, result.stderr
    assert_no_traceback((result.stdout, result.stderr))
    line = layers_line(result.stdout)
    if play == "no-worker" and WHY_NOT_TWO is None:
        assert line == FIRST_LINE + "two processes"
        notes = result.stderr.splitlines()
        assert len(notes) == 1 and notes[0].startswith("note: the fast path's worker process could not start ("), \
            result.stderr
        assert notes[0].endswith("going on in one process, with the same numbers")
    else:
        why = WHY_NOT_TWO if play == "no-worker" else expected_reason(play, monkeypatch)
        assert why is not None, f"{play} plays a machine where two processes would be safe"
        assert line == FIRST_LINE + f"one process ({why})"
        assert result.stderr == ""
    normal, normal_log = normal_run
    assert_no_traceback((normal.stdout, normal.stderr))
    if WHY_NOT_TWO is not None:
        pytest.skip(f"no two-process run to compare with here: {WHY_NOT_TWO}")
    assert layers_line(normal.stdout) == FIRST_LINE + "two processes"
    assert normal.stderr == ""
    assert (tmp_path / "log.txt").read_bytes() == normal_log


def test_an_unknown_play_is_refused_with_the_plays_listed():
    """python -m tools.as_platform linux: exit 2, one usage line naming every play."""
    result = subprocess.run([sys.executable, "-m", "tools.as_platform", "linux", "--epochs", "1"], cwd=ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("usage: python3 -m tools.as_platform")
    assert all(play in result.stderr for play in as_platform.PLAYS)


# =====================================================================================
# 2. The worker of a real run killed
# =====================================================================================
KILL_TRAIN = 20_000        # 157 steps of 128 (some 0.7 s here): every kill below lands in the
# first few steps, where the scheduler's backoff (worth_offering) is at most 64 batches, so the
# main process offers the worker a batch again, and finds it dead, well before the run ends.
# (A worker killed later, while the scheduler leaves it out for the rest of the run, is never
# noticed: the run ends with the same log and no note at all.)


@pytest.fixture(scope="module")
def unkilled_run(tmp_path_factory):
    """KILL_TRAIN training images, 1 epoch, run once without a kill: (data folder, the log's bytes)."""
    folder = tmp_path_factory.mktemp("kill")
    write_mnist(str(folder / "data"), n_train=KILL_TRAIN, n_test=200)
    result = run(folder / "data", folder / "log.txt")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and layers_line(result.stdout) == FIRST_LINE + "two processes"
    return folder / "data", (folder / "log.txt").read_bytes()


def children(pid):
    """The pids of process pid's children (its main thread's), or None if it has gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return None


def wait_for_worker(process, seconds=60):
    """The one child of `process` (its worker, forked at the first batch), polled for until it
    appears; the test fails if it does not within `seconds` or the process ends first."""
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        kids = children(process.pid)
        if kids:
            assert len(kids) == 1, f"more than the worker: {kids}"
            return kids[0]
        assert kids is not None and process.poll() is None, "the run ended before it forked a worker"
        time.sleep(0.001)
    raise AssertionError(f"no worker process within {seconds} s")


def state(pid):
    """Process pid's state letter from /proc/PID/stat: R running, S asleep, Z dead, ..."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def wait_until_running(pid, times, seconds=1.0):
    """Return once process pid has been seen starting to run `times` times (asleep, then running:
    the worker woken for a batch's forward, backward or update), or after `seconds` anyway."""
    seen, last = 0, "S"
    give_up = time.monotonic() + seconds
    while seen < times and time.monotonic() < give_up:
        now = state(pid)
        seen += now == "R" and last != "R"
        last = now
        time.sleep(0.0001)


@needs_two
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="no /proc/PID/task/PID/children here to find the worker by")
@pytest.mark.parametrize("running", [0, 1, 2], ids=["as it appears", "in its first work", "in its second work"])
def test_a_worker_killed_in_a_real_run_is_one_line(unkilled_run, tmp_path, running):
    """python mnist_net.py --epochs 1, its worker (the main process's only child) killed with
    SIGKILL in the first steps: as soon as it appears, or once seen running for the first or
    second time (most often in a forward, a backward, or between batches).  Either the run ends
    with exit 0, one note on stderr and the unkilled run's log byte for byte; or, killed in an
    optimizer update, it stops within 10 s with exit 1 and one error line, leaving the earlier
    log at that path as it was.  Never a traceback, never a hang."""
    data, unkilled_log = unkilled_run
    log = tmp_path / "log.txt"
    earlier = "# an earlier run\n7 7\n"
    log.write_text(earlier)
    process = subprocess.Popen(command(data, log), cwd=ROOT, env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = wait_for_worker(process)
        wait_until_running(worker, running)
        assert process.poll() is None, "the run ended before the kill"
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        out, err = process.communicate(timeout=RUN_TIMEOUT)
        ended = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert_no_traceback((out, err))
    assert layers_line(out) == FIRST_LINE + "two processes"
    lines = err.splitlines()
    assert len(lines) == 1, f"exit {process.returncode}, stderr {err!r}"
    if process.returncode == 0:
        assert lines[0].startswith("note: the fast path's worker process stopped"), err
        assert lines[0].endswith("going on in one process, with the same numbers"), err
        assert log.read_bytes() == unkilled_log
    else:
        assert process.returncode == 1, err
        assert ended <= 10, f"{ended:.1f} s from the kill to the end"
        assert lines[0] == f"error: {tp.STOPPED_IN_UPDATE}"
        assert log.read_text() == earlier


KILL_BEFORE_UPDATE = """
import os, signal, sys, time
sys.path.insert(0, os.getcwd())
import fast_layers

real, calls = fast_layers.FastDual.update, []


def update(self, g, lr_scale=1.0):
    # the third update, after a batch the worker shared: the worker killed while it waits for it
    calls.append(1)
    team = self.net.team
    if len(calls) == 3 and team.on_worker and team.worker is not None:
        worker = team.worker
        give_up = time.monotonic() + 10
        while not worker.channel.head[0][3] and time.monotonic() < give_up:   # until it sleeps
            time.sleep(0.0002)
        os.kill(worker.process.pid, signal.SIGKILL)
        while worker.process.is_alive():
            time.sleep(0.001)
    return real(self, g, lr_scale)


fast_layers.FastDual.update = update
import mnist_net
sys.exit(mnist_net.main(sys.argv[1:]))
"""


@needs_two
def test_a_worker_killed_while_it_waits_for_an_update_is_one_note(small_data, normal_run, tmp_path):
    """python mnist_net.py with its worker killed (by a wrapper around FastDual.update) once it
    sleeps waiting for the third optimizer update, which it has not been sent yet: the update
    is done in this process (it never read it), so the run ends with exit 0, one note and the
    normal run's log."""
    script = tmp_path / "kill_before_update.py"
    script.write_text(KILL_BEFORE_UPDATE)
    log = tmp_path / "log.txt"
    result = subprocess.run([sys.executable, str(script)] + command(small_data, log)[2:], cwd=ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert_no_traceback((result.stdout, result.stderr))
    assert result.returncode == 0, f"exit {result.returncode}, stderr {result.stderr!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: the fast path's worker process stopped"), result.stderr
    assert log.read_bytes() == normal_run[1]


# =====================================================================================
# 3. The worker killed at fixed points, in this process
# =====================================================================================
def killed_in_worker(real, main_pid, on_call):
    """`real` (a bound method) that kills the process calling it with SIGKILL at its on_call-th
    call in the worker; the main process (main_pid) always runs the real method, as it must when
    it redoes the worker's work.  (The worker counts its calls in its own copy of `calls`.)"""
    calls = [0]

    def method(*args, **kwargs):
        if os.getpid() != main_pid:
            calls[0] += 1
            if calls[0] == on_call:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return method


def killed_and_reference(networks, spec):
    """(a network, its dual optimizer), (the same from the same seed, every batch in one process)."""
    killed, reference = networks(spec), networks(spec)
    reference.team.skip = IN_PROCESS
    return (killed, fl.make_optimizer("dual", killed)), (reference, fl.make_optimizer("dual", reference))


def assert_alone_from_now_on(net, capsys, when):
    """net's team runs alone, said in exactly one note on stderr (naming `when` it stopped)."""
    assert net.team.alone is not None and net.team.worker is None and not net.team.on_worker
    err = capsys.readouterr().err
    assert err.splitlines() == [f"note: {net.team.alone}"]
    assert f"the fast path's worker process stopped{when}; going on in one process" in err


@needs_two
@pytest.mark.parametrize("spec, where, method", [
    ("seed", 0, "forward"),             # the main process waits for the logits
    (BN_DROPOUT, 0, "forward"),         # ... at batch norm's sums
    (BN_DROPOUT, -1, "forward"),        # ... after both batch norms tracked and dropout drew its mask
    ("seed", 0, "backward"),
    (BN_DROPOUT, -1, "backward"),       # the first layer of the backward, before batch norm's totals
    (BN_DROPOUT, 0, "backward"),        # the last, after them
], ids=["seed-first-forward", "bn-first-forward", "bn-last-forward", "seed-first-backward",
        "bn-last-backward", "bn-first-backward"])
def test_a_worker_killed_in_a_forward_or_backward_changes_no_number(networks, capsys, spec, where, method):
    """Slice 1's copy of one layer made to SIGKILL the worker in its second training step
    (the worker ran the first): that step completes in the main process, which says so in one
    note and runs alone from then on (net.team.alone); over 3 steps in float32 with the dual
    optimizer the logits, loss, gradient, optimizer step, parameters and running statistics
    are exactly those of a network from the same seed that ran every step in one process, and
    so are the evaluation logits after them."""
    (killed, opt_k), (reference, opt_r) = killed_and_reference(networks, spec)
    layer = killed.slices[1][where]
    assert layer is not killed.slices[0][where]
    setattr(layer, method, killed_in_worker(getattr(layer, method), os.getpid(), on_call=2))
    worker = worker_takes_every_slice(killed)
    for step in range(3):
        x, y = batch(64, 80 + step, np.float32)
        with deadline(30):
            outputs_k = train_step(killed, opt_k, x, y, m.cosine_scale(step, 3))
        outputs_r = train_step(reference, opt_r, x, y, m.cosine_scale(step, 3))
        assert reference.team.worker is None and not reference.team.on_worker
        if step == 0:
            assert killed.team.on_worker and killed.team.alone is None and worker.process.is_alive()
        assert_same_step(killed, reference, outputs_k, outputs_r)
    x, _ = batch(64, 89, np.float32)
    np.testing.assert_array_equal(killed.forward(x, train=False), reference.forward(x, train=False))
    assert worker.process.exitcode == -signal.SIGKILL            # it died by the kill, in this test
    assert_alone_from_now_on(killed, capsys, f" during a {method}")
    delattr(layer, method)                                     # the cycle layer -> method -> layer


def kill_while_it_waits(worker):
    """SIGKILL the worker once it sleeps on its pipe waiting for the main process's next message
    (after its spin of Channel.SPIN s), and wait until it is gone."""
    asleep = worker.channel.head[0]                    # main -> worker mailbox: (count, length, read, asleep, ...)
    give_up = time.monotonic() + 10
    while not asleep[3] and time.monotonic() < give_up:
        time.sleep(0.0002)
    assert asleep[3], "the worker never went to sleep"
    os.kill(worker.process.pid, signal.SIGKILL)
    while worker.process.is_alive():
        time.sleep(0.001)


@needs_two
@pytest.mark.parametrize("before, note", [
    ("forward", ""),
    ("backward", " during a backward"),
    ("update", ""),
])
def test_a_worker_killed_between_two_parts_of_a_step_changes_no_number(networks, capsys, before, note):
    """The worker of the seed network, after it shared the first training step, killed from
    outside while it waits between two parts of the second: before its forward, its backward or
    its optimizer update (which it was not sent yet).  The step completes in the main process,
    one note says so, and over 3 steps every number is exactly that of a network from the same
    seed run in one process."""
    (killed, opt_k), (reference, opt_r) = killed_and_reference(networks, "seed")
    worker = worker_takes_every_slice(killed)
    for step in range(3):
        x, y = batch(64, 95 + step, np.float32)
        lr_scale = m.cosine_scale(step, 3)
        with deadline(30):
            if step == 1 and before == "forward":
                kill_while_it_waits(worker)
            logits = killed.forward(x, train=True)
            loss, dlogits = m.softmax_cross_entropy(logits, y)
            if step == 1 and before == "backward":
                assert killed.team.on_worker
                kill_while_it_waits(worker)
            killed.backward(dlogits)
            if step == 1 and before == "update":
                assert killed.team.on_worker
                kill_while_it_waits(worker)
            update = np.array(opt_k.update(killed.grad, lr_scale))
            killed.flat += update
        if step == 0:
            assert killed.team.on_worker and worker.process.is_alive()
        assert_same_step(killed, reference, (logits, loss, update),
                         train_step(reference, opt_r, x, y, lr_scale))
    assert worker.process.exitcode == -signal.SIGKILL
    assert_alone_from_now_on(killed, capsys, note)


@needs_two
def test_a_worker_killed_in_an_optimizer_update_raises_worker_lost(networks, capsys):
    """The optimizer the worker holds (net.optimizer, patched before the fork) SIGKILLs the
    worker in its half of the first update: opt.update raises two_processes.WorkerLost, an
    OSError with no file name (the command line prints it as "error: TEXT"), within 10 s; its
    text is one line; the worker is dropped; nothing is printed."""
    net = networks("seed")
    opt = fl.make_optimizer("dual", net)
    assert net.optimizer is opt
    opt.update_part = killed_in_worker(opt.update_part, os.getpid(), on_call=1)
    worker = worker_takes_every_slice(net)
    x, y = batch(64, 90, np.float32)
    _, dlogits = m.softmax_cross_entropy(net.forward(x, train=True), y)
    net.backward(dlogits)
    assert net.team.on_worker
    start = time.monotonic()
    with deadline(30):
        with pytest.raises(tp.WorkerLost) as error:
            opt.update(net.grad)
    assert time.monotonic() - start <= 10
    assert isinstance(error.value, OSError) and error.value.filename is None
    text = str(error.value)
    assert text and "\n" not in text and "optimizer step" in text
    assert net.team.worker is None and worker.process.exitcode == -signal.SIGKILL
    assert capsys.readouterr().err == ""
    del opt.update_part                                        # the cycle opt -> method -> opt


@needs_two
def test_the_scheduler_doubles_its_backoff_once_per_retry(networks, monkeypatch):
    """worth_offering's promise: on a machine that keeps this process off its core, "the next
    32, then 64, ... run here before the worker is tried again".  Every judgement made slow
    (this process's CPU time never advances), the batches in this process between two that the
    worker shared are 32, then 64."""
    monkeypatch.setattr(tp, "time", types.SimpleNamespace(perf_counter=time.perf_counter, sleep=time.sleep,
                                                           process_time=lambda: 0.0))
    net = networks("seed")
    opt = fl.make_optimizer("dual", net)
    worker_takes_every_slice(net)
    del net.team.judge_worker                  # the real judge (make_worker_win silenced it)
    x, y = batch(32, 99, np.float32)
    shared = []
    with deadline(60):
        for step in range(1, 111):
            train_step(net, opt, x, y)
            if net.team.on_worker:
                shared.append(step)
    assert shared[:2] == [1, 2]                # four slow verdicts: after the second backward
    gaps = [b - a - 1 for a, b in zip(shared[1:], shared[2:])]
    assert gaps == [32, 64], f"the worker shared batches {shared}"


# =====================================================================================
# 4. The decision on its own
# =====================================================================================
LINUX = {"system": "linux", "machine": "x86_64", "start_methods": ["fork", "spawn", "forkserver"],
         "fork": True, "blas": ("openblas",), "threads": 1}
# The first line, "layers: the fast path (fast_layers.py), one process (REASON)", fits 100
# columns when REASON has at most 100 - 54 characters.
MOST = 100 - len(FIRST_LINE + "one process ()")


@pytest.mark.parametrize("changes, batch_size, serving, names", [
    ({}, 128, False, None),
    ({"machine": "amd64"}, 128, False, None),
    ({}, 16, False, None),                              # WORKER_FROM itself
    ({}, None, False, None),                            # the batch not known yet (FastNetwork)
    ({"system": "win32", "start_methods": ["spawn"], "fork": False}, 128, False, "Windows"),
    ({"system": "cygwin"}, 128, False, "Cygwin"),
    ({"system": "darwin"}, 128, False, "macOS"),
    ({"start_methods": ["spawn", "forkserver"]}, 128, False, "'fork'"),
    ({"fork": False}, 128, False, "'fork'"),
    ({"machine": "aarch64"}, 128, False, "aarch64"),
    ({"machine": "arm64"}, 128, False, "arm64"),
    ({"blas": None}, 128, False, "threadpoolctl"),
    ({"blas": ("mkl",)}, 128, False, "mkl"),
    ({"blas": ()}, 128, False, "BLAS"),
    ({"threads": 2}, 128, False, "threads"),
    ({}, 128, True, "server"),
    ({}, 8, False, "batches of 8"),
    ({}, 15, False, "batches of 15"),
], ids=["linux", "amd64", "batch-16", "batch-unknown", "windows", "cygwin", "macos", "no-fork-method",
        "no-os-fork", "aarch64", "arm64", "no-threadpoolctl", "mkl", "no-blas", "threads", "serving",
        "batch-8", "batch-15"])
def test_why_one_process_names_the_cause_in_few_words(changes, batch_size, serving, names):
    """why_one_process(batch_size, serving, facts) for Linux on x86-64 with OpenBLAS and one
    thread, and for each fact changed alone: None where two processes are safe, else a reason
    that names the cause and fits the first line in 100 columns (at most 46 characters)."""
    why = tp.why_one_process(batch_size, serving, facts=dict(LINUX, **changes))
    if names is None:
        assert why is None
    else:
        assert MOST == 46
        assert why is not None and names in why and len(why) <= MOST, why


def test_why_one_process_reads_platform_facts_when_given_none(monkeypatch):
    """Without facts it asks platform_facts() (what tools/as_platform.py replaces): a played
    macOS is refused, a played Linux with OpenBLAS accepted."""
    monkeypatch.setattr(tp, "platform_facts", lambda: dict(LINUX, system="darwin"))
    assert tp.why_one_process(128) == "no safe fork on macOS"
    monkeypatch.setattr(tp, "platform_facts", lambda: dict(LINUX))
    assert tp.why_one_process(128) is None
