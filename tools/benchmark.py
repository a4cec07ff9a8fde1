"""The benchmark: mnist_net.py against the PyTorch peer, whole processes, runs alternated.

    python3 -m tools.benchmark [--rounds N] [--peer-python PYTHON] [--net SPEC] [--plain]

(from the repo root; --plain times the chapter's own layers.)
"""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def blas_info():
    """'openblas 0.3.x, threads: ...' for the NumPy in use."""
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        name = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except (AttributeError, KeyError, TypeError):
        name = "unknown BLAS"
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    threads = threads or f"{os.cpu_count()} (one per core, the default)"
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


def benchmark(argv=None):
    """Seconds per epoch, images per second and peak memory, ours and PyTorch's, interleaved."""
    import argparse
    import csv
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repo: tools/..
    default_peer = os.path.join(os.path.dirname(root), "shared", "bench", "peer_torch.py")
    p = argparse.ArgumentParser(prog="python3 -m tools.benchmark",
                                description="Time mnist_net.py against the PyTorch peer: the marginal "
                                            "cost of two more epochs (3 epochs minus 1), whole processes, "
                                            "runs alternated.")
    p.add_argument("--rounds", type=int, default=3, help="runs of each (default: %(default)s)")
    p.add_argument("--data-dir", default=os.path.join(root, "mnist_data"),
                   help="MNIST folder, raw IDX files (default: %(default)s)")
    p.add_argument("--peer", default=default_peer,
                   help="the PyTorch peer script (default: %(default)s)")
    p.add_argument("--peer-python", default=sys.executable,
                   help="a Python that has torch, to run the peer (default: this one)")
    p.add_argument("--net", metavar="SPEC",
                   help="the layers, passed on as --net SPEC to both programs "
                        "(default: not given, each program's own network)")
    p.add_argument("--plain", action="store_true",
                   help="time mnist_net.py --plain, the chapter's own layers (the peer is unchanged)")
    args = p.parse_args(argv)
    have_peer = os.path.isfile(args.peer) and subprocess.run(
        [args.peer_python, "-c", "import torch"], capture_output=True).returncode == 0
    print(blas_info())
    if not have_peer:
        print("PyTorch peer not run: it needs the peer script and a Python with torch (pip install torch numpy):")
        print(f"  --peer {args.peer}, --peer-python {args.peer_python}")
    with tempfile.TemporaryDirectory() as tmp:
        history = os.path.join(tmp, "history.csv")
        net = [] if args.net is None else ["--net", args.net]
        ours = lambda e: [sys.executable, os.path.join(root, "mnist_net.py"), "--epochs", str(e), "--quiet",
                          "--no-download", "--data-dir", args.data_dir,
                          "--log-file", os.path.join(tmp, "log.txt"), "--history", history] + net \
            + ["--plain"] * args.plain
        peer = lambda e: [args.peer_python, args.peer, args.data_dir, str(e)] + net
        results = {"mnist_net": {1: [], 3: []}, "pytorch": {1: [], 3: []}}
        accuracy, memory = {}, {"mnist_net": 0.0, "pytorch": 0.0}
        inside = {"mnist_net": [], "pytorch": []}    # each 3-epoch run's own median epoch time
        for r in range(args.rounds):
            for epochs in (1, 3):
                for who, cmd in (("mnist_net", ours), ("pytorch", peer)):
                    if who == "pytorch" and not have_peer:
                        continue
                    seconds, mb, out = timed_run(cmd(epochs))
                    results[who][epochs].append(seconds)
                    memory[who] = max(memory[who], mb)
                    if epochs == 3 and who == "mnist_net":
                        accuracy[who] = float(out.split("accuracy:")[1].split("%")[0])
                        with open(history, newline="") as f:
                            inside[who].append(median([float(row["seconds"]) for row in csv.DictReader(f)]))
                    elif epochs == 3:
                        report = json.loads(out.strip().splitlines()[-1])
                        accuracy[who] = 100 * report["test_acc"]
                        inside[who].append(report["epoch_s_median"])
                    print(f"  round {r + 1}: {who:9s} {epochs} epoch(s) {seconds:6.2f} s  {mb:6.0f} MB",
                          flush=True)
    rows = []
    for who in ("mnist_net", "pytorch"):
        if results[who][3]:
            per_epoch = median([(b - a) / 2 for a, b in zip(results[who][1], results[who][3])])
            rows.append((who, per_epoch))
            print(f"{who:9s}  {per_epoch:5.2f} s/epoch  {60000 / per_epoch:8,.0f} img/s  "
                  f"peak {memory[who]:5.0f} MB  test acc after 3 epochs {accuracy[who]:.2f}%")
    if len(rows) == 2:
        print(f"ratio mnist_net / pytorch: {rows[0][1] / rows[1][1]:.2f}x "
              f"(median over {args.rounds} rounds of (3-epoch run - 1-epoch run) / 2)")
    ours_inside = median(inside["mnist_net"])
    print("seconds per epoch as each program times itself (median epoch of each 3-epoch run, then of rounds):")
    line = f"  mnist_net {ours_inside:.2f} (test evaluation included)"
    if inside["pytorch"]:
        peer_inside = median(inside["pytorch"])
        line += f", pytorch {peer_inside:.2f} (training only), ratio {ours_inside / peer_inside:.2f}x"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(benchmark())
