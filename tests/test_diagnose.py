"""--diagnose on the synthetic digits: a healthy network gets no verdict, and each way of breaking
training (a learning rate far too high or too low, ReLUs killed by a large negative bias, weights
too large at the start, a blow-up to NaN) gets its own, named."""
import os

import numpy as np
import pytest

import mnist_net as m
from tools import diagnose as dg
from tools.command_line import parse_args

STEPS, OVERFIT_STEPS = 60, 100            # the tests' diagnosis: short, the synthetic digits learn fast


@pytest.fixture(autouse=True)
def short_diagnosis(monkeypatch):
    monkeypatch.setattr(dg, "STEPS", STEPS)
    monkeypatch.setattr(dg, "OVERFIT_STEPS", OVERFIT_STEPS)


def diagnosis(data_dir, *flags, prepare=None):
    """(verdicts, printed lines) of a diagnosis with these command-line flags; every line fits
    100 columns."""
    lines = []
    args = parse_args(["--data-dir", data_dir, *flags])
    verdicts = dg.diagnose(args, m.load_mnist(data_dir), lines.append, prepare=prepare)
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    return verdicts, lines


def problems(verdicts):
    return [problem for problem, _ in verdicts]


def verdict_lines(lines):
    """Each verdict as one line: its first line, "verdict: ...", joined with the indented lines
    that go on with it."""
    verdicts = []
    for line in lines:
        if line.startswith("verdict:"):
            verdicts.append(line)
        elif verdicts and line.startswith("  "):           # the verdicts come last
            verdicts[-1] += " " + line.strip()
    return verdicts


def test_default_network_reports_no_problem(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    log = tmp_path / "log.txt"
    code = m.main(["--data-dir", data_dir, "--diagnose", "--log-file", str(log)])
    out = capsys.readouterr().out
    assert code == 0
    verdicts = verdict_lines(out.splitlines())
    assert len(verdicts) == 1 and verdicts[0].startswith("verdict: no problem found")
    assert verdicts[0].endswith("and 100 examples are overfit.")
    for part in ("1) First loss", "ln(10) = 2.303", "2) Activations", "relu after conv1", "3) Parameters",
                 "conv1.weight", "fc2.bias", "update/size", "4) Overfitting 100 examples", "near zero, as it should be"):
        assert part in out
    assert f"the first {STEPS} steps of the run" in out
    assert not log.exists()                             # a diagnosis trains, reports and writes nothing


def test_default_deep_like_network_with_batch_norm_reports_no_problem(small_mnist):
    data_dir, _, _ = small_mnist
    verdicts, lines = diagnosis(data_dir, "--net", "conv4p1 bn relu pool fc16 relu fc10")
    assert verdicts == [], lines
    assert any(line.strip().startswith("bn (bn1)") for line in lines)


def test_learning_rate_of_1_is_named(small_mnist):
    data_dir, _, _ = small_mnist
    verdicts, lines = diagnosis(data_dir, "--lr", "1", "--sgd-lr", "1")
    assert problems(verdicts)[0] == "learning rate too high"
    assert verdict_lines(lines)[0].startswith("verdict: learning rate too high:")
    assert "--lr 0.1 --sgd-lr 0.1" in verdict_lines(lines)[0]           # what to try


def test_loss_turning_nan_stops_the_diagnosis_with_its_report(small_mnist):
    data_dir, _, _ = small_mnist
    verdicts, lines = diagnosis(data_dir, "--optimizer", "momentum", "--sgd-lr", "1e6", "--schedule", "constant")
    text = "\n".join(lines)
    assert "The loss became nan at step" in text and "the diagnosis stops here" in text
    assert "Overfitting 100 examples: skipped" in text
    assert problems(verdicts)[0] == "learning rate too high"
    assert "Warning" not in text


def test_learning_rate_of_1e_7_is_not_learning(small_mnist):
    data_dir, _, _ = small_mnist
    verdicts, lines = diagnosis(data_dir, "--lr", "1e-7", "--sgd-lr", "1e-7")
    assert "not learning" in problems(verdicts)
    assert "learning rate too low" in problems(verdicts)
    assert "learning rate too high" not in problems(verdicts)
    assert any("100 examples cannot be overfit" in line for line in verdict_lines(lines))


def test_mostly_dead_relus_are_flagged(small_mnist):
    data_dir, _, _ = small_mnist

    def kill_the_conv_relus(net):                   # every conv output far below 0: the ReLU never fires
        net.params["conv1.bias"][...] = -10.0

    verdicts, lines = diagnosis(data_dir, prepare=kill_the_conv_relus)
    assert "dead units" in problems(verdicts)
    dead = next(line for line in verdict_lines(lines) if line.startswith("verdict: dead units"))
    assert "relu after conv1: 100% of 8" in dead
    row = next(line for line in lines if line.strip().startswith("relu after conv1"))
    assert row.endswith("8 of 8 (100%)")
    assert "vanishing gradients" in problems(verdicts)           # conv1 gets no gradient at all


def test_a_few_dead_units_are_reported_but_not_a_verdict(small_mnist):
    data_dir, _, _ = small_mnist

    def kill_two_filters(net):
        net.params["conv1.bias"][:2] = -10.0

    verdicts, lines = diagnosis(data_dir, prepare=kill_two_filters)
    assert "dead units" not in problems(verdicts)
    row = next(line for line in lines if line.strip().startswith("relu after conv1"))
    assert row.endswith("2 of 8 (25%)")


def test_overconfident_initial_weights_are_flagged(small_mnist):
    data_dir, _, _ = small_mnist

    def scale_up_the_last_layer(net):
        net.params["fc2.weight"][...] *= 30

    verdicts, lines = diagnosis(data_dir, prepare=scale_up_the_last_layer)
    assert problems(verdicts)[0] == "initial loss far from ln(10)"
    first = float(next(line for line in lines if line.startswith("1) First loss")).split()[3].rstrip(";"))
    assert abs(first - np.log(10)) > dg.INITIAL_LOSS_OFF


def test_failing_to_overfit_100_examples_is_a_verdict(small_mnist, monkeypatch):
    data_dir, _, _ = small_mnist
    monkeypatch.setattr(dg, "NEAR_ZERO", 0.0)                        # no loss is below 0
    verdicts, lines = diagnosis(data_dir)
    assert problems(verdicts) == ["cannot overfit 100 examples"]


def test_first_loss_is_the_real_runs_first_step(small_mnist):
    """The diagnosis starts from the run's own initial weights and first batch."""
    data_dir, (train_x, train_y), _ = small_mnist
    _, lines = diagnosis(data_dir, "--seed", "4", "--batch-size", "32")
    rng = np.random.default_rng(4)                                    # as train() and train_epoch() draw
    net = m.Network(parse_args(["--seed", "4"]).net, rng)
    idx = rng.permutation(len(train_x))[:32]
    loss, _ = m.loss_and_grads(net, m.to_input(train_x[idx]), train_y[idx])
    assert next(line for line in lines if line.startswith("1) ")).startswith(f"1) First loss {loss:.3f};")


def test_diagnose_refuses_what_it_does_not_do(tmp_path, capsys):
    model = tmp_path / "m.npz"
    model.write_bytes(b"")
    for extra in (["--load-model", str(model)], ["--save-model", str(tmp_path / "x.npz")], ["--trace"]):
        with pytest.raises(SystemExit) as e:
            parse_args(["--diagnose", *extra])
        assert e.value.code == 2
        assert "--diagnose trains a fresh network" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.npz")


@pytest.mark.parametrize("net", ["seed", "deep"])
def test_every_line_fits_100_columns(small_mnist, tmp_path, capsys, monkeypatch, net):
    """The whole output of --diagnose on the seed and deep networks, verdicts included (a
    learning rate of 1e-7 gets three of them, with advice)."""
    data_dir, _, _ = small_mnist
    monkeypatch.setattr(dg, "STEPS", 8)                 # short: only the printing is tested here
    monkeypatch.setattr(dg, "OVERFIT_STEPS", 3)
    monkeypatch.setattr(dg, "PROBE", 32)
    code = m.main(["--data-dir", data_dir, "--diagnose", "--net", net, "--batch-size", "16", "--lr", "1e-7",
                   "--sgd-lr", "1e-7", "--log-file", str(tmp_path / "log.txt")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(verdict_lines(lines)) >= 2
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert lines[1] == f'  --net "{m.PRESETS[net] if net == "deep" else parse_args([]).net}"'
