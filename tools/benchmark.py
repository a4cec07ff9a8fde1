"""The benchmark: mnist_net.py against the PyTorch peer, and on a busy machine; whole
processes, runs alternated.

    python3 -m tools.benchmark [--rounds N] [--peer-python PYTHON] [--only seed,deep,busy]
                               [--net SPEC] [--plain]

(from the repo root; --plain times the chapter's own layers.)  It reports three ratios, each
the median over the rounds of the marginal epoch, (time for 3 epochs - time for 1) / 2:
  seed  mnist_net.py against peer_torch.py DATA E 128 (bar: at most 1.0x)
  deep  mnist_net.py --net deep (its recipe) against the peer on the same layers (bar: 1.5x)
  busy  mnist_net.py with another process keeping one core busy, against the idle machine
        (bar: 1.6x); the two runs' logs must be byte-identical.
--net SPEC times that network in both programs instead of seed and deep.
"""
import filecmp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

BARS = {"seed": 1.0, "deep": 1.5, "busy": 1.6}


def blas_info():
    """'NumPy 2.x, openblas 0.3.x, BLAS threads ...' for the NumPy in use."""
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        name = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except (AttributeError, KeyError, TypeError):
        name = "unknown BLAS"
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    threads = threads or f"{os.cpu_count()} (fast path in two processes: 1 each)"
    return f"NumPy {np.__version__}, {name}, BLAS threads {threads}"


def timed_run(cmd):
    """(wall seconds, peak resident MB, stdout) of one whole process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)         # wait4: this child's own peak memory
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().strip()[-1500:]}")
        return seconds, usage.ru_maxrss / 1024, out.read()


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class Busy:
    """Another process keeping one core busy (a Python loop), for as long as the with-block."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)                                   # let it take its core
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def own_epoch(history):
    """The median epoch time mnist_net.py wrote in its --history file."""
    import csv
    with open(history, newline="") as f:
        return median([float(row["seconds"]) for row in csv.DictReader(f)])


def compare(title, runs, rounds, say):
    """Time each named command (a function of the epoch count, returning the command and what to
    do with its output) at 1 and 3 epochs, in turn, for `rounds` rounds.  Returns
    {name: {"marginal": [per round], "memory": MB, "accuracy": %, "inside": [own epoch times]}}."""
    results = {name: {"marginal": [], "memory": 0.0, "accuracy": None, "inside": []} for name in runs}
    say(f"{title}:")
    for r in range(rounds):
        for name, run in (runs.items() if r % 2 == 0 else reversed(list(runs.items()))):
            seconds = {}
            for epochs in (1, 3):
                cmd, context, read = run(epochs, r)
                with context():
                    seconds[epochs], mb, out = timed_run(cmd)
                got = results[name]
                got["memory"] = max(got["memory"], mb)
                if epochs == 3:
                    got["accuracy"], inside = read(out)
                    got["inside"].append(inside)
                say(f"  round {r + 1}: {name:9s} {epochs} epoch(s) {seconds[epochs]:6.2f} s  {mb:6.0f} MB")
            results[name]["marginal"].append((seconds[3] - seconds[1]) / 2)
    return results


def report(results, a, b, what, say):
    """Print each program's marginal epoch and the ratio a / b; returns the median ratio."""
    for name in (a, b):
        got = results[name]
        per_epoch = median(got["marginal"])
        accuracy = f"  test acc after 3 epochs {got['accuracy']:.2f}%" if got["accuracy"] is not None else ""
        say(f"{name:9s}  {per_epoch:5.2f} s/epoch  {60000 / per_epoch:8,.0f} img/s  "
            f"peak {got['memory']:5.0f} MB{accuracy}")
    ratios = [x / y for x, y in zip(results[a]["marginal"], results[b]["marginal"])]
    ratio = median(ratios)
    say(f"ratio {what}: {ratio:.2f}x (per round {', '.join(f'{x:.2f}' for x in ratios)})")
    return ratio


def benchmark(argv=None):
    """The ratios above, each from whole processes run in turn."""
    import argparse
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repo: tools/..
    sys.path.insert(0, root)
    import mnist_net
    default_peer = os.path.join(os.path.dirname(root), "shared", "bench", "peer_torch.py")
    p = argparse.ArgumentParser(prog="python3 -m tools.benchmark",
                                description="Time mnist_net.py against the PyTorch peer and on a busy "
                                            "machine: the marginal cost of two more epochs (3 epochs "
                                            "minus 1), whole processes, runs alternated.")
    p.add_argument("--rounds", type=int, default=3, help="runs of each (default: %(default)s)")
    p.add_argument("--data-dir", default=os.path.join(root, "mnist_data"),
                   help="MNIST folder, raw IDX files (default: %(default)s)")
    p.add_argument("--peer", default=default_peer,
                   help="the PyTorch peer script (default: %(default)s)")
    p.add_argument("--peer-python", default=sys.executable,
                   help="a Python that has torch, to run the peer (default: this one)")
    p.add_argument("--only", default="seed,deep,busy",
                   help="which of seed, deep, busy to run, with commas (default: %(default)s)")
    p.add_argument("--net", metavar="SPEC",
                   help="time this network in both programs instead of seed and deep "
                        "(default: not given)")
    p.add_argument("--plain", action="store_true",
                   help="time mnist_net.py --plain, the chapter's own layers (the peer is unchanged)")
    args = p.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in BARS]
    if unknown:
        p.error(f"--only {args.only}: unknown {', '.join(unknown)}; use seed, deep or busy")
    have_peer = os.path.isfile(args.peer) and subprocess.run(
        [args.peer_python, "-c", "import torch"], capture_output=True).returncode == 0
    say = lambda line: print(line, flush=True)
    say(blas_info())
    if not have_peer:
        say("PyTorch peer not run: it needs the peer script and a Python with torch (pip install torch numpy):")
        say(f"  --peer {args.peer}, --peer-python {args.peer_python}")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        def ours(net, tag=""):
            def run(epochs, r):
                history = os.path.join(tmp, f"history{tag}.csv")
                cmd = [sys.executable, os.path.join(root, "mnist_net.py"), "--epochs", str(epochs), "--quiet",
                       "--no-download", "--data-dir", args.data_dir,
                       "--log-file", os.path.join(tmp, f"log{tag}{epochs}.txt"), "--history", history] \
                    + ([] if net is None else ["--net", net]) + ["--plain"] * args.plain
                read = lambda out: (float(out.split("accuracy:")[1].split("%")[0]), own_epoch(history))
                return cmd, (Busy if tag == "busy" else Quiet), read
            return run

        def peer(net):
            def run(epochs, r):
                cmd = [args.peer_python, args.peer, args.data_dir, str(epochs)] + ([] if net is None else ["--net", net])

                def read(out):
                    line = json.loads(out.strip().splitlines()[-1])
                    return 100 * line["test_acc"], line["epoch_s_median"]
                return cmd, Quiet, read
            return run

        comparisons = [(f"--net {args.net}", args.net, args.net)] if args.net else \
            [(w, None if w == "seed" else "deep", None if w == "seed" else mnist_net.PRESETS["deep"])
             for w in ("seed", "deep") if w in wanted]
        for title, our_net, peer_net in comparisons:
            runs = {"mnist_net": ours(our_net)}
            if have_peer:
                runs["pytorch"] = peer(peer_net)
            results = compare(title, runs, args.rounds, say)
            if have_peer:
                ratios[title] = report(results, "mnist_net", "pytorch", "mnist_net / pytorch", say)
            else:
                report_alone(results["mnist_net"], say)
            inside = f"  mnist_net {median(results['mnist_net']['inside']):.2f} (test evaluation included)"
            if have_peer:
                peer_inside = median(results["pytorch"]["inside"])
                ours_inside = median(results["mnist_net"]["inside"])
                inside += f", pytorch {peer_inside:.2f} (training only), ratio {ours_inside / peer_inside:.2f}x"
            say("seconds per epoch as each program times itself (median epoch of each 3-epoch run, then of rounds):")
            say(inside)
        if "busy" in wanted and not args.net:
            runs = {"idle": ours(None, "idle"), "busy": ours(None, "busy")}
            results = compare("busy (one core kept busy by another process) against idle", runs, args.rounds, say)
            ratios["busy"] = report(results, "busy", "idle", "busy / idle", say)
            pairs = [[os.path.join(tmp, f"log{tag}{e}.txt") for tag in ("idle", "busy")] for e in (1, 3)]
            if all(os.path.isfile(path) for pair in pairs for path in pair):
                same = all(filecmp.cmp(*pair, shallow=False) for pair in pairs)
                say(f"logs of the idle and busy runs byte-identical: {'yes' if same else 'NO'}")
            else:
                say("logs of the idle and busy runs: not written, not compared")
    if ratios:
        say("summary: " + ", ".join(f"{name} {ratio:.2f}x (bar {BARS[name]:.1f}x)" if name in BARS
                                    else f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
    return 0


class Quiet:
    """Nothing else started: the machine as it is."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def report_alone(got, say):
    per_epoch = median(got["marginal"])
    say(f"mnist_net  {per_epoch:5.2f} s/epoch  {60000 / per_epoch:8,.0f} img/s  peak {got['memory']:5.0f} MB  "
        f"test acc after 3 epochs {got['accuracy']:.2f}%")


if __name__ == "__main__":
    sys.exit(benchmark())
