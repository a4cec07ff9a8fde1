"""python3 -m tools.benchmark, on a small dataset, with a stand-in for the PyTorch peer."""
import os
import sys

import pytest

import mnist_net as m
import tools.benchmark as bench
from conftest import ROOT

# A peer that behaves like ../shared/bench/peer_torch.py: DATA_DIR [EPOCHS], one JSON line.
# Its cost is 0.2 s of start-up plus 0.3 s per epoch, slept, so its marginal epoch is 0.3 s.
FAKE_PEER = """
import json, sys, time
epochs = int(sys.argv[2])
time.sleep(0.2 + 0.3 * epochs)
print(json.dumps({"peer": "fake", "threads": 1, "epoch_s_median": 0.3, "train_s": 0.3 * epochs,
                  "test_acc": 0.5}))
"""


@pytest.mark.slow
def test_benchmark_alternates_both_programs_and_reports_the_ratio(small_mnist, tmp_path, capsys, monkeypatch):
    data_dir, _, _ = small_mnist
    peer = tmp_path / "peer.py"
    peer.write_text(FAKE_PEER)
    (tmp_path / "fake_torch").mkdir()
    (tmp_path / "fake_torch" / "torch.py").write_text("")     # the benchmark asks for an importable torch
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake_torch"))
    code = bench.benchmark(["--rounds", "2", "--data-dir", data_dir, "--peer", str(peer),
                            "--peer-python", sys.executable, "--only", "seed"])
    out = capsys.readouterr().out
    assert code == 0
    assert "BLAS threads" in out
    runs = [line.split(":")[1].split()[:2] for line in out.splitlines() if line.strip().startswith("round")]
    # each program's 1- and 3-epoch runs together; which program goes first alternates by round
    assert runs == [["mnist_net", "1"], ["mnist_net", "3"], ["pytorch", "1"], ["pytorch", "3"],
                    ["pytorch", "1"], ["pytorch", "3"], ["mnist_net", "1"], ["mnist_net", "3"]]
    peer_row = next(line for line in out.splitlines() if line.startswith("pytorch "))
    marginal = float(peer_row.split()[1])
    assert 0.25 < marginal < 0.5                     # (0.2 + 0.9 - 0.2 - 0.3) / 2 = 0.3, plus start-up noise
    assert "test acc after 3 epochs 50.00%" in peer_row
    ours_row = next(line for line in out.splitlines() if line.startswith("mnist_net "))
    ours = float(ours_row.split()[1])
    ratio_line = out.split("ratio mnist_net / pytorch: ")[1].splitlines()[0]
    ratio = float(ratio_line.split("x")[0])
    per_round = [float(r) for r in ratio_line.split("per round ")[1].rstrip(")").split(", ")]
    assert len(per_round) == 2 and min(per_round) - 0.01 <= ratio <= max(per_round) + 0.01
    assert abs(ratio - ours / marginal) < 0.1 * ratio + 0.05     # median of ratios vs ratio of medians
    assert f"summary: seed {ratio:.2f}x (bar 1.0x)" in out
    inside = out.split("seconds per epoch as each program times itself")[1]
    assert "pytorch 0.30 (training only)" in inside
    ours_inside = float(inside.split("mnist_net ")[1].split()[0])
    three_epoch_runs = [float(line.split()[5]) for line in out.splitlines()
                        if line.strip().startswith("round") and "mnist_net 3 epoch" in line]
    assert 0 < ours_inside < min(three_epoch_runs) / 3 + 0.05   # an epoch, not a whole process, nor a loss
    own_ratio = float(inside.split("ratio ")[1].split("x")[0])
    assert abs(own_ratio - ours_inside / 0.30) < 0.05
    assert max(len(line) for line in out.splitlines()) <= 100, max(out.splitlines(), key=len)


@pytest.mark.slow
def test_benchmark_without_torch_times_only_mnist_net(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    code = bench.benchmark(["--rounds", "1", "--data-dir", data_dir, "--peer", str(tmp_path / "missing.py"),
                            "--only", "seed"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PyTorch peer not run" in out
    assert "mnist_net " in out and "ratio" not in out
    assert "as each program times itself" in out and "(test evaluation included)" in out
    lines = [line for line in out.splitlines() if "--peer-python" not in line]     # that one names paths
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)


@pytest.mark.slow
def test_busy_runs_the_default_network_idle_and_busy_and_compares_the_logs(small_mnist, tmp_path, capsys,
                                                                          monkeypatch):
    """--only busy: the default run on the idle machine and with a busy loop in another process,
    alternated; the busy/idle ratio, and whether the two logs are the same bytes (they are)."""
    data_dir, _, _ = small_mnist
    loops = []                                                   # every busy loop the benchmark starts
    enter = bench.Busy.__enter__

    def entered(busy):
        loops.append(busy)
        return enter(busy)
    monkeypatch.setattr(bench.Busy, "__enter__", entered)
    code = bench.benchmark(["--rounds", "1", "--data-dir", data_dir, "--peer", str(tmp_path / "missing.py"),
                            "--only", "busy"])
    out = capsys.readouterr().out
    assert code == 0
    runs = [line.split(":")[1].split()[:2] for line in out.splitlines() if line.strip().startswith("round")]
    assert runs == [["idle", "1"], ["idle", "3"], ["busy", "1"], ["busy", "3"]]
    assert "logs of the idle and busy runs byte-identical: yes" in out
    ratio = float(out.split("ratio busy / idle: ")[1].split("x")[0])
    # on 600 images an epoch lasts a few milliseconds, so the ratio is noise (it can even be negative)
    assert f"summary: busy {ratio:.2f}x (bar 1.6x)" in out
    assert len(loops) == 2                                       # one for each busy run
    assert all(loop.process.poll() is not None for loop in loops)  # and each is stopped and reaped


def test_unknown_only_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.benchmark(["--only", "seed,fast"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--only seed,fast: unknown fast" in err


def test_net_spec_is_passed_to_both_programs(tmp_path, monkeypatch, capsys):
    peer = tmp_path / "peer.py"
    peer.write_text(FAKE_PEER)
    (tmp_path / "fake_torch").mkdir()
    (tmp_path / "fake_torch" / "torch.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake_torch"))
    commands = []

    def fake_timed_run(cmd):              # records the command instead of running it
        commands.append(cmd)
        seconds = float(len(commands))    # later runs take longer: every marginal epoch is positive
        if "--history" in cmd:            # mnist_net.py: its accuracy line and its history file
            with open(cmd[cmd.index("--history") + 1], "w") as f:
                f.write("epoch,loss,train_accuracy,test_accuracy,seconds\n1,0.5,0.5,0.5,1.0\n")
            return seconds, 100.0, "Full MNIST test accuracy: 50.00%\n"
        return seconds, 100.0, '{"epoch_s_median": 1.0, "test_acc": 0.5}\n'

    monkeypatch.setattr(bench, "timed_run", fake_timed_run)
    common = ["--rounds", "1", "--data-dir", str(tmp_path), "--peer", str(peer), "--peer-python", sys.executable]
    spec = "conv16p1 bn relu pool fc10"
    assert bench.benchmark(common + ["--net", spec]) == 0
    assert sorted(os.path.basename(cmd[1]) for cmd in commands) == ["mnist_net.py"] * 2 + ["peer.py"] * 2
    assert all(cmd.count("--net") == 1 and cmd[cmd.index("--net") + 1] == spec for cmd in commands)
    commands.clear()
    assert bench.benchmark(common + ["--only", "seed"]) == 0     # the seed network: neither sees --net
    assert len(commands) == 4 and not any("--net" in cmd for cmd in commands)
    assert not any("--plain" in cmd for cmd in commands)
    commands.clear()
    assert bench.benchmark(common + ["--only", "deep"]) == 0     # ours by its preset, the peer by its layers
    ours = [cmd for cmd in commands if os.path.basename(cmd[1]) == "mnist_net.py"]
    theirs = [cmd for cmd in commands if cmd not in ours]
    assert len(ours) == 2 and all(cmd[cmd.index("--net") + 1] == "deep" for cmd in ours)
    assert len(theirs) == 2 and all(cmd[cmd.index("--net") + 1] == m.PRESETS["deep"] for cmd in theirs)
    commands.clear()
    assert bench.benchmark(common + ["--only", "seed", "--plain"]) == 0  # the chapter's layers: mnist_net.py only
    ours = [cmd for cmd in commands if os.path.basename(cmd[1]) == "mnist_net.py"]
    assert len(ours) == 2 and all(cmd.count("--plain") == 1 for cmd in ours)
    assert not any("--plain" in cmd for cmd in commands if cmd not in ours)
    commands.clear()
    assert bench.benchmark(common + ["--only", "busy"]) == 0     # mnist_net.py alone, idle and busy
    assert len(commands) == 4 and all(os.path.basename(cmd[1]) == "mnist_net.py" for cmd in commands)
    assert "summary: busy" in capsys.readouterr().out


def test_the_real_peer_prints_the_fields_the_benchmark_reads():
    peer = os.path.join(ROOT, "..", "shared", "bench", "peer_torch.py")
    if not os.path.isfile(peer):
        pytest.skip("the PyTorch peer (peer_torch.py, the project's shared benchmark script, kept in "
                    "../shared/bench/ beside the repository) is not here")
    with open(peer) as f:
        source = f.read()
    assert '"epoch_s_median"' in source and '"test_acc"' in source and "json.dumps" in source
