"""Two processes for the fast path: the second slice of every batch run by a worker process.

fast_layers.py cuts every batch into two fixed slices and runs each through its own copy of the
layers; the numbers depend on the batch alone, never on where a slice ran.  This module holds
what lets slice 1 run in a second process, on the second core, where that is safe: the fork,
the shared memory, the mailboxes, the scheduler that decides when to offer the worker a batch,
and the optimizers' update in two halves.  Where it is not safe (why_one_process says why), or
when the worker cannot start or dies, fast_layers.py runs both slices in this process: the same
numbers, the same predictions log, byte for byte.

It imports nothing of fast_layers.py: it knows the layers by their kind ("bn", "dropout") and
the network by the methods it calls (forward_steps, backward_steps, run_steps, cut_into_slices).
Measured on the project's 2-core machine: a step of 64 images of the deep network 13.2 -> 8.4
ms, of 128 of the seed network 3.1 -> 2.3 ms (docs/speed.md).
"""
import contextlib
import functools
import math
import mmap
import multiprocessing
import os
import pickle
import platform
import select
import signal
import sys
import threading
import time
import weakref

import numpy as np

WORKER_FROM = 16            # smaller batches run both slices here (a fork would cost more)


# --- Where two processes are safe ---------------------------------------------------------------
def platform_facts():
    """What decides whether a second process is safe here, read in one place (the tests replace
    this function to play another platform): the system, the CPU, the start methods, whether
    os.fork exists, NumPy's BLAS libraries as threadpoolctl sees them (None: threadpoolctl is not
    installed), and the threads alive now."""
    return {"system": sys.platform, "machine": platform.machine().lower(),
            "start_methods": multiprocessing.get_all_start_methods(), "fork": hasattr(os, "fork"),
            "blas": blas_libraries(), "threads": threading.active_count()}


@functools.lru_cache(maxsize=None)
def blas_libraries():
    """The BLAS libraries loaded with NumPy, by threadpoolctl's names ('openblas', 'mkl',
    'blis', ...), or None if threadpoolctl is not installed.  Asked once (some milliseconds)."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return tuple(lib["internal_api"] for lib in threadpoolctl.ThreadpoolController().select(user_api="blas").info())


SYSTEMS = {"win32": "Windows", "cygwin": "Windows (Cygwin)", "darwin": "macOS"}


def why_one_process(batch_size=None, serving=False, facts=None):
    """None if two processes are safe here for batches of batch_size, else why not, in a few words.

    Safe means all of these (else the fast path runs in one process, with the same numbers):
    1) Linux.  macOS's own libraries (Accelerate, which NumPy 2 uses there) are not safe in a
       child forked after the parent used them, and Python's docs call fork unsafe on macOS;
       Windows has no fork.
    2) The 'fork' start method: the worker is a copy of this process, network and all.
    3) An x86-64 CPU.  The mailboxes hand a message over by writing it, then a counter, in
       shared memory, and the reader trusts that once it sees the counter the message is there.
       x86-64 keeps stores in that order; ARM does not promise to, and Python's standard library
       has no memory fence to make it.
    4) OpenBLAS, set to one thread through threadpoolctl: two processes each running BLAS
       threads on two cores wait for each other at every product (epochs 2-6x slower, 30x on a
       busy machine).
    5) No other thread alive at the fork (a fork copies only the thread that calls it: a lock
       another thread held stays locked in the child forever); --serve's page runs threads.
    6) Batches of at least WORKER_FROM images: for smaller ones a fork would cost more than it
       saves.
    """
    facts = platform_facts() if facts is None else facts
    system = facts["system"]
    if not system.startswith("linux"):
        return f"no safe fork on {SYSTEMS.get(system, system)}"                              # 1)
    if "fork" not in facts["start_methods"] or not facts["fork"]:
        return "no 'fork' start method here"                                                 # 2)
    if facts["machine"] not in ("x86_64", "amd64"):
        return f"two are proven on x86-64 only, not {facts['machine'] or 'this CPU'}"       # 3)
    if facts["blas"] is None:
        return "threadpoolctl is not installed"                                              # 4)
    if "openblas" not in facts["blas"]:
        return f"NumPy's BLAS is {', '.join(facts['blas']) or 'not found'}, not OpenBLAS"
    if serving:
        return "the page's server runs threads"                                              # 5)
    if facts["threads"] > 1:
        return "other threads are running"
    if batch_size is not None and batch_size < WORKER_FROM:
        return f"batches of {batch_size}: a worker starts from {WORKER_FROM}"                   # 6)
    return None


_blas_limit = None


def blas_to_one_thread():
    """Set NumPy's OpenBLAS to one thread, from the main thread, before any fork (the worker
    inherits the setting).  Only when why_one_process() said two processes are safe."""
    global _blas_limit
    if _blas_limit is None:
        import threadpoolctl
        _blas_limit = threadpoolctl.ThreadpoolController().select(internal_api="openblas").limit(limits=1)
    return _blas_limit


def note(line):
    """One line about the worker, on stderr (the run goes on)."""
    print(f"note: {line}", file=sys.stderr, flush=True)


class WorkerLost(OSError):
    """The worker stopped where its work cannot be redone exactly (in the middle of an
    optimizer step): the run must stop.  An OSError, as the system took the process away
    (killed, out of memory): the command line shows its text as one line and exits 1."""


class WorkerGone(Exception):
    """The worker process is no longer there (killed, out of memory): found while waiting."""


# --- Shared memory ------------------------------------------------------------------------------
def shared_array(a):
    """A copy of array `a` in memory that a process forked later shares (an anonymous mmap)."""
    shared = np.frombuffer(mmap.mmap(-1, max(a.nbytes, 1)), a.dtype, count=a.size).reshape(a.shape)
    shared[...] = a
    return shared


def same_view(view, vector, other):
    """The view of `other` (a flat vector) that `view` is of `vector`: the same place and shape."""
    start = (view.ctypes.data - vector.ctypes.data) // view.itemsize
    return other[start:start + view.size].reshape(view.shape)


def share_network(net):
    """Move the network's flat parameter and gradient vectors, slice 1's gradient vector and the
    running statistics into shared memory (the same values; every view of them opened again),
    so that the worker sees every step; then cut the network into slices again on them."""
    old, net.flat = net.flat, shared_array(net.flat)
    old_grad, net.grad = net.grad, shared_array(net.grad)
    moved = {}
    for layer in net.layers:
        for views, new, before in ((layer.params, net.flat, old), (layer.grads, net.grad, old_grad)):
            for name, p in views.items():
                moved[id(p)] = views[name] = same_view(p, before, new)
        for name, b in layer.buffers.items():
            moved[id(b)] = layer.buffers[name] = shared_array(b)
    for names in (net.params, net.grads, net.state):
        for key, value in names.items():
            names[key] = moved.get(id(value), value)
    net.cut_into_slices([net.grad] + [shared_array(g) for g in net.slice_grads[1:]])


# --- Mailboxes ----------------------------------------------------------------------------------
class Channel:
    """One end of the way between the main process and the worker: a mailbox in shared memory
    for each direction (a head of counts, from byte 64 the pickled message), watched for up
    to SPIN seconds by a receiver, which then sleeps on a pipe until woken.  (A pipe alone took
    some 90 us a round trip here, mostly the kernel waking the other process; the mailbox
    under 1 us, and the two processes meet six to eight times per batch.)

    The handover is correct on x86-64 only: the sender writes the message, then the count, and
    x86-64 makes the reader see those two stores in that order (why_one_process, 3)."""
    SPIN = 0.001
    SIZE = 1 << 23                              # the largest message (the input slice of 2,600 images)

    def __init__(self, boxes, wake_me, wake_them, me, alive):
        self.boxes, self.me, self.received, self.alive = boxes, me, 0, alive
        self.wake_me, self.wake_them = wake_me, wake_them
        self.head = [np.frombuffer(box, np.int64, count=5) for box in boxes]   # count, length, read, asleep, claimed

    def send(self, message):
        data = pickle.dumps(message, protocol=5)
        if 64 + len(data) > self.SIZE:          # Team.fits_mailbox keeps them smaller
            raise ValueError(f"a message of {len(data)} bytes does not fit the mailbox")
        head = self.head[self.me]
        waited = 0
        while head[2] < head[0]:                # the other side has not read the last one yet
            time.sleep(0 if waited < 1000 else 0.001)
            waited += 1
            if waited % 1000 == 0 and not self.alive():
                raise WorkerGone()
        self.boxes[self.me][64:64 + len(data)] = data
        head[1] = len(data)
        head[0] += 1                            # after the message: the receiver reads it whole
        if head[3]:                             # the receiver sleeps: wake it
            try:
                os.write(self.wake_them, b"!")
            except BlockingIOError:             # a wake-up is already waiting there
                pass
            except BrokenPipeError:             # no one reads that pipe any more: the other side is gone
                raise WorkerGone() from None

    def try_send(self, message):
        """send, unless the last message has not been read yet: then False."""
        head = self.head[self.me]
        if head[2] < head[0]:
            return False
        self.send(message)
        return True

    def receive(self, spin=True):
        """The next message; whether the other side lives is asked every 0.1 s while waiting
        (WorkerGone if not).  spin=False: sleep at once (this process would take a core that
        others need)."""
        head = self.head[1 - self.me]
        if head[0] <= self.received:
            give_up = time.perf_counter() + self.SPIN * spin
            while head[0] <= self.received and time.perf_counter() < give_up:
                pass
        if head[0] <= self.received:
            head[3] = 1
            while head[0] <= self.received:
                ready, _, _ = select.select([self.wake_me], [], [], 0.1)
                if ready and not os.read(self.wake_me, 4096) or not self.alive():
                    raise WorkerGone()
            head[3] = 0
        message = pickle.loads(self.boxes[1 - self.me][64:64 + head[1]])
        self.received += 1
        head[2] = self.received
        return message

    def meet(self, step, board):
        """An "all" step of a step program, from the worker's side: send this slice's parts
        (what it wrote on the board since), take what the step wrote."""
        new = {key: value for key, value in board.items() if key not in self.sent}
        self.send(("parts", new))
        _, written = self.receive()
        board.update(written)
        self.sent.update(new, written)


# --- The worker ---------------------------------------------------------------------------------
class Worker:
    """The process that runs slice 1 of a network's batches: forked from this one, it has its
    own copy of the network (its own layer objects) and shares the parameters, the running
    statistics and slice 1's gradients with it through shared memory."""
    handed_over = None                        # the network, for the moment of the fork only

    def __init__(self, net):
        context = multiprocessing.get_context("fork")        # ValueError where there is none
        self.main_pid = os.getpid()
        boxes = [mmap.mmap(-1, Channel.SIZE) for _ in range(2)]
        to_worker, to_main = os.pipe(), os.pipe()        # (read, write) ends, for waking only
        try:
            for fd in to_worker + to_main:
                os.set_blocking(fd, False)
            self.lock = context.Lock()                               # for claim()
            self.process = context.Process(target=Worker.serve, args=(self, boxes, to_worker[0], to_main[1],
                                                                      self.main_pid),
                                           name="fast_layers worker", daemon=True)
            self.channel = Channel(boxes, to_main[0], to_worker[1], 0, self.process.is_alive)
            self.waited = 0.0                                            # seconds spent in receive()
            self.claimed = self.channel.head[0][4:]                       # the last forward taken
            Worker.handed_over = net              # the child finds it in its copy of this memory
            try:
                self.process.start()
            finally:
                Worker.handed_over = None
        except BaseException:
            for fd in to_worker + to_main:
                os.close(fd)
            raise
        os.close(to_worker[0])
        os.close(to_main[1])
        self.fds = (to_main[0], to_worker[1])
        # a network its program has dropped closes the pipes: the worker sees that and stops
        self.stopper = weakref.finalize(net, Worker.stop, self.fds, self.process, self.main_pid)

    @staticmethod
    def stop(fds, process, main_pid):
        if os.getpid() != main_pid:           # a later worker's copy of this finalizer: not its own to stop
            return
        for fd in fds:
            try:
                os.close(fd)
            except OSError:                   # closed already
                pass
        process.terminate()                   # it keeps nothing: stopping it at once loses nothing
        process.join()

    def claim(self, offer):
        """Take forward number `offer` (the main process's slice 1): True for the first to ask.
        A process killed while it held the lock is WorkerGone to the other one, not a hang."""
        while not self.lock.acquire(timeout=0.1):
            if not (self.process.is_alive() if os.getpid() == self.main_pid else os.getppid() == self.main_pid):
                raise WorkerGone()
        try:
            if self.claimed[0] >= offer:
                return False
            self.claimed[0] = offer
            return True
        finally:
            self.lock.release()

    def serve(self, boxes, wake_me, wake_them, parent):
        """The worker's loop: forwards and backwards of slice 1, the second half of updates."""
        net = Worker.handed_over
        signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is for the main process
        channel = Channel(boxes, wake_me, wake_them, 1, lambda: os.getppid() == parent)
        took_last = True
        while True:
            try:
                # after an offer the main process took back (a busy machine), wait without spinning
                offer, kind, flag, x = channel.receive(spin=took_last)
                if kind == "update":                  # the second half of the parameters
                    lr_scale, t = flag
                    net.optimizer.update_part(net.grad, lr_scale, t, slice(net.grad.size // 2, None))
                    channel.send(("done", None))
                    continue
                if kind == "forward":
                    took_last = self.claim(offer)
                    if not took_last:                 # the main process ran it itself
                        continue
                    net.trained = flag
                    steps = net.forward_steps(flag, 2)
                else:
                    steps = net.backward_steps(flag, 2)
                channel.sent = set()
                x = net.run_steps(steps, [None, x], {}, [1], channel)[1]
                channel.send(("done", None if x is None else np.ascontiguousarray(x)))
            except (WorkerGone, EOFError, OSError):   # the main process has closed its end or gone
                os._exit(0)
            except Exception as error:            # told to the main process, which raises it
                try:
                    channel.send(("error", f"{type(error).__name__}: {error}"))
                except (WorkerGone, OSError):
                    os._exit(0)

    def send(self, message):
        self.channel.send(message)

    def receive(self):
        start = time.perf_counter()
        what, value = self.channel.receive()
        self.waited += time.perf_counter() - start
        if what == "error":
            raise RuntimeError(f"the fast path's worker process failed: {value}")
        return value

    def meet(self, step, board):
        """An "all" step of a step program, from the main process's side: add the worker's
        parts to the board, run the step, send what it wrote (but slice 0's own parts)."""
        board.update(self.receive())
        before = set(board)
        step(board)
        self.send(("board", {key: board[key] for key in board
                             if key not in before and not (len(key) == 3 and key[2] == 0)}))

    def close(self):
        self.stopper()                        # once: its pipes' numbers may be another's later


# --- The main process's side: offers, the scheduler, the halves, and the fallback ---------------
STOPPED_IN_UPDATE = ("the fast path's worker process stopped during an optimizer step, which cannot "
                     "be redone exactly; run the command again (the same numbers), or with --plain")


class Team:
    """This process and its worker, for one network: the worker started at the first batch
    offered to it, slice 1 of a batch run there when it claims it in time, the scheduler that
    leaves it out while the machine is busy, and the optimizer's update in two halves.

    If the worker cannot start, or dies, the network goes on in this process with one note
    (self.alone says why): a forward or backward it was running is redone here from the state
    before it, with the same numbers.  Only a death in the middle of an update, which has
    changed half-written optimizer state, stops the run (WorkerLost)."""

    def __init__(self, net):
        self.net = net
        blas_to_one_thread()      # before the fork, in the main thread (the worker inherits it)
        share_network(net)
        self.worker, self.offers, self.on_worker, self.alone = None, 0, False, None
        self.skip, self.backoff, self.slow = 0, 32, 0.0

    def adopt(self, opt):
        """The arrays `opt` changes at every step into shared memory, and a worker forked from
        now on that knows the optimizer."""
        for path in opt.shared_state():
            owner, *parents, name = [opt] + path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            setattr(owner, name, shared_array(getattr(owner, name)))
        self.drop_worker()

    # -- a forward and a backward
    def forward(self, steps, xs, train):
        """Run a step program on the two slices xs (a list, filled in place) with slice 1 offered
        to the worker: False if it was not offered (the caller runs both slices itself)."""
        self.on_worker = False
        if self.worker is not None and not self.worker.process.is_alive():      # killed between batches
            self.go_alone("the fast path's worker process stopped; going on in one process, "
                          "with the same numbers")
        if self.alone or not self.fits_mailbox(xs) or not self.worth_offering() or not self.offer(train, xs[1]):
            return False
        before, inputs = self.snapshot(), list(xs)
        self.before = (train, before, inputs)
        self.start_clock()
        # slice 0 up to the first point where the slices meet; then slice 1 is the worker's if
        # it has taken it by now, else this process takes it (a busy core makes a late worker)
        first = next((j for j, (kind, _) in enumerate(steps) if kind == "all"), len(steps))
        board = {}
        run = self.net.run_steps
        with self.watching("during a forward") as redo:
            run(steps[:first], xs, board, [0])
            if not self.worker.claim(self.offers):
                self.on_worker = True
                run(steps[first:], xs, board, [0], self.worker)
                xs[1] = self.worker.receive()
                self.judge_worker()
            else:
                run(steps[:first], xs, board, [1])
                run(steps[first:], xs, board, [0, 1])
        if redo:
            self.restore(before)
            xs[:] = inputs
            run(steps, xs, {}, [0, 1])
        return True

    def backward(self, steps, ds, input_grad):
        """The backward of a forward the worker ran (False if it did not: the caller runs both)."""
        if not self.on_worker:
            return False
        self.start_clock()
        gradients = list(ds)
        run = self.net.run_steps
        with self.watching("during a backward") as redo:
            self.worker.send((self.offers, "backward", input_grad, np.ascontiguousarray(ds[1])))
            run(steps, ds, {}, [0], self.worker)
            ds[1] = self.worker.receive()
            self.judge_worker()
        if redo:               # the worker's slice-1 caches are lost: its forward again, here
            train, before, inputs = self.before
            self.restore(before)
            run(self.net.forward_steps(train, 2), list(inputs), {}, [0, 1])
            ds[:] = gradients
            run(steps, ds, {}, [0, 1])
        return True

    def snapshot(self):
        """What a forward changes besides the layers' caches: the running statistics and the
        dropout generators (copies), to redo the forward exactly if the worker dies in it."""
        buffers = [(b, b.copy()) for layer in self.net.layers for b in layer.buffers.values()]
        rngs = {id(layer.rng): (layer.rng, layer.rng.bit_generator.state)
                for layer in self.net.layers if layer.kind == "dropout"}
        return buffers, list(rngs.values())

    @staticmethod
    def restore(snapshot):
        buffers, rngs = snapshot
        for b, saved in buffers:
            b[...] = saved
        for rng, state in rngs:
            rng.bit_generator.state = state

    @contextlib.contextmanager
    def watching(self, when):
        """with self.watching(when) as redo: the block's talk with the worker.  If the worker is
        gone: one note, this network in one process from now on, and redo (a list) made true;
        any other error stops the worker (it may be out of step) and goes on up."""
        redo = []
        try:
            yield redo
        except WorkerGone:
            self.go_alone(f"the fast path's worker process stopped {when}; going on in one process, "
                          "with the same numbers")
            self.on_worker = False
            redo.append(True)
        except BaseException:
            self.drop_worker()
            raise

    # -- the optimizer's update in two halves
    def update_in_halves(self, opt, g, lr_scale, t):
        """opt's update on the first half of the parameters here and on the second half in the
        worker, at the same time, if the worker took this network's last batch (it is awake and
        the machine not busy): True.  Else False, and the optimizer does it all."""
        if not (self.on_worker and self.worker is not None and opt is self.net.optimizer and g is self.net.grad):
            return False
        channel = self.worker.channel
        halves, done = (slice(0, g.size // 2), slice(g.size // 2, None)), 0
        try:
            if not channel.try_send((self.offers, "update", (lr_scale, t), None)):
                return False
            opt.update_part(g, lr_scale, t, halves[0])
            done = 1
            self.worker.receive()
        except WorkerGone:
            if channel.head[0][2] < channel.head[0][0]:      # it never read the update: do the rest here
                self.go_alone("the fast path's worker process stopped; going on in one process, "
                              "with the same numbers")
                for half in halves[done:]:
                    opt.update_part(g, lr_scale, t, half)
                return True
            self.drop_worker()
            raise WorkerLost(STOPPED_IN_UPDATE) from None
        except BaseException:
            self.drop_worker()
            raise
        return True

    # -- the worker: started, judged, dropped
    def offer(self, train, x1):
        """Offer the worker (started if need be) the next forward: False if it has not read
        the last one yet (a busy machine), and this process runs both slices."""
        if self.worker is None:
            if platform_facts()["threads"] > 1:
                self.go_alone("threads started after the network was built; the fast path runs "
                              "in one process, with the same numbers")
                return False
            try:
                self.worker = Worker(self.net)
            except (OSError, ValueError, MemoryError) as e:          # no fork, no memory, no pipes
                self.go_alone(f"the fast path's worker process could not start ({type(e).__name__}: {e}); "
                              "going on in one process, with the same numbers")
                return False
        self.offers += 1
        try:
            return self.worker.channel.try_send((self.offers, "forward", train, np.ascontiguousarray(x1)))
        except WorkerGone:
            self.go_alone("the fast path's worker process stopped; going on in one process, "
                          "with the same numbers")
            return False

    def go_alone(self, why):
        note(why)
        self.alone = why
        self.drop_worker()

    def drop_worker(self):
        if self.worker is not None:
            self.worker.close()            # maybe out of step: a new one next time
            self.worker = None

    def fits_mailbox(self, xs):
        """Whether every message about slice 1 fits a mailbox: its input, its input gradient,
        a dropout mask all take at most its images times the largest map of one image."""
        x = xs[1]
        largest = max([math.prod(x.shape[1:])] + [math.prod(shape) for shape in self.net.shapes])
        return len(xs[0]) + len(x) >= WORKER_FROM and len(x) * largest * x.itemsize + (1 << 16) <= Channel.SIZE

    def worth_offering(self):
        """Whether to offer the worker this batch.  When another program keeps a core busy,
        three processes share two cores and the two halves of a batch wait for each other:
        the run is faster in this process alone.  So when this process was kept off its core
        for 40% of a forward or backward the worker shared (its CPU time against the clock),
        or waited for the worker longer than it computed, three or four times running, the
        next 32, then 64, ... up to 4,096 run here before the worker is tried again."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def start_clock(self):
        """The clock, this process's CPU time and its time waited so far, for judge_worker."""
        self.started = (time.perf_counter(), time.process_time(), self.worker.waited if self.worker else 0.0)

    def judge_worker(self):
        """After a forward or backward the worker shared: was this process kept off its core,
        or kept waiting for the worker longer than it computed itself?"""
        if self.skip:                   # this batch's forward has left the worker out already
            return
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        waited = self.worker.waited - self.started[2]
        # one slow batch is no proof (the worker was asleep, a page fault): a running score,
        # over about the last five, must say "slow" before the worker is left out
        self.slow = 0.8 * self.slow + 0.2 * (cpu < 0.6 * wall or waited > wall - waited)
        if self.slow > 0.5:
            self.skip, self.backoff, self.slow = self.backoff, min(2 * self.backoff, 4096), 0.45
        elif self.slow < 0.1:
            self.backoff = 32
