"""The command line end to end, on a small dataset the tests write."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mnist_net as m
from conftest import ROOT, write_mnist
from reference import network_naive


def run_main(capsys, *argv):
    code = m.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_writes_log_and_model(small_mnist, tmp_path, capsys):
    data_dir, _, (test_x, test_y) = small_mnist
    log, model = tmp_path / "log.txt", tmp_path / "model.npz"
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "2", "--batch-size", "32",
                              "--log-file", str(log), "--save-model", str(model))
    assert code == 0, err
    assert "epoch 2/2" in out and "train acc" in out and "test acc" in out
    assert "Full MNIST test accuracy:" in out
    assert "Predictions: [" in out and f"Actual:      {test_y[:10]}" in out
    table = np.loadtxt(log, dtype=int)
    assert table.shape == (100, 2)
    np.testing.assert_array_equal(table[:, 1], test_y)
    accuracy = (table[:, 0] == table[:, 1]).mean()
    assert accuracy > 0.9                                    # synthetic digits are easy
    text = log.read_text()
    assert f"test accuracy {100 * accuracy:.2f}%" in text
    assert "# per-class accuracy:" in text and "# confusion matrix" in text
    assert "optimizer=dual" in text
    assert model.exists()


def test_save_then_load_gives_same_predictions(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    model, log1, log2 = tmp_path / "m.npz", tmp_path / "a.txt", tmp_path / "b.txt"
    assert run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--filters", "3", "--hidden", "16",
                    "--log-file", str(log1), "--save-model", str(model))[0] == 0
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--load-model", str(model), "--log-file", str(log2))
    assert code == 0 and "epoch" not in out
    np.testing.assert_array_equal(np.loadtxt(log1, dtype=int), np.loadtxt(log2, dtype=int))


def test_saved_model_has_pytorch_names_and_layouts(small_mnist, tmp_path, capsys):
    """The saved arrays, run through a plain PyTorch-order forward pass, give the
    logged predictions: names, shapes, flatten order and input scaling all agree."""
    data_dir, _, (test_x, _) = small_mnist
    model, log = tmp_path / "m.npz", tmp_path / "log.txt"
    run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--filters", "3", "--hidden", "16",
             "--log-file", str(log), "--save-model", str(model))
    with np.load(model) as f:
        stored = {k: f[k] for k in f.files}
    assert stored["conv.weight"].shape == (3, 1, 3, 3) and stored["conv.bias"].shape == (3,)
    assert stored["fc1.weight"].shape == (16, 3 * 13 * 13) and stored["fc1.bias"].shape == (16,)
    assert stored["fc2.weight"].shape == (10, 16) and stored["fc2.bias"].shape == (10,)
    assert "filters=3" in str(stored["config"])
    params = {k: v.astype(np.float64) for k, v in stored.items() if "." in k}
    x = (test_x[:, None].astype(np.float64) / 255 - stored["input_mean"]) / stored["input_std"]
    pred = network_naive(params, x).argmax(axis=1)
    np.testing.assert_array_equal(pred, np.loadtxt(log, dtype=int)[:, 0])


def test_same_seed_gives_identical_log_rows(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    rows = []
    for name in ("a", "b"):
        log = tmp_path / f"{name}.txt"
        run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--seed", "3", "--log-file", str(log))
        rows.append([line for line in log.read_text().splitlines() if not line.startswith("#")])
    assert rows[0] == rows[1]


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_single_optimizers_and_constant_schedule_run(small_mnist, tmp_path, capsys, optimizer):
    data_dir, _, _ = small_mnist
    log = tmp_path / "log.txt"
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "2", "--optimizer", optimizer,
                              "--schedule", "constant", "--limit", "200", "--log-file", str(log), "--quiet")
    assert code == 0, err
    assert "epoch" not in out and "Full MNIST test accuracy:" in out
    assert f"optimizer={optimizer}" in log.read_text() and "limit=200" in log.read_text()


def test_limit_trains_on_first_n(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--limit", "64",
                            "--log-file", str(tmp_path / "l.txt"))
    assert code == 0 and "Training on 64 images" in out


@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "2.5"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--filters", "x"], "--filters"),
    (["--hidden", "0"], "--hidden"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--sgd-lr", "-0.1"], "--sgd-lr"),
    (["--momentum", "1.5"], "--momentum"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--log-file", "/no/such/folder/log.txt"], "--log-file"),
    (["--save-model", "/no/such/folder/m.npz"], "--save-model"),
    (["--save-model", "model.pkl"], "--save-model"),
    (["--load-model", "/no/such/model.npz"], "--load-model"),
    (["--seed", "-1"], "--seed"),
    (["--log-file", "."], "--log-file"),
    (["--log-file", ""], "--log-file"),
    (["--data-dir", __file__], "--data-dir"),
])
def test_bad_values_are_refused_before_any_work(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        m.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "Traceback" not in err
    last = err.strip().splitlines()[-1]            # the usage lines name every flag; this one says why
    assert last.startswith("mnist_net.py: error: ") and flag in last


def test_missing_data_is_one_clear_line_and_keeps_old_log(tmp_path, capsys):
    log = tmp_path / "log.txt"
    log.write_text("earlier results\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(capsys, "--data-dir", str(empty), "--log-file", str(log), "--no-download")
    assert code == 1
    assert err.count("\n") == 1 and "train-images-idx3-ubyte: missing" in err
    assert log.read_text() == "earlier results\n"
    assert os.listdir(empty) == []


def test_damaged_model_file_is_refused(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--load-model", str(bad),
                            "--log-file", str(tmp_path / "l.txt"))
    assert code == 1 and "not a readable .npz model file" in err
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--load-model", str(other),
                            "--log-file", str(tmp_path / "l.txt"))
    assert code == 1 and "missing conv.weight" in err
    assert not (tmp_path / "l.txt").exists()


@pytest.mark.parametrize("change, message", [
    ({"conv.bias": np.float32(1)}, "conv.bias has shape ()"),
    ({"conv.weight": np.array(["a"])}, "conv.weight is not an array of finite floats"),
    ({"input_mean": np.zeros(3, np.float32)}, "input_mean has shape (3,)"),
    ({"fc1.bias": np.full(16, np.nan, np.float32)}, "fc1.bias is not an array of finite floats"),
    ({"fc2.weight": np.zeros((10, 17), np.float32)}, "fc2.weight has shape (10, 17), expected (10, 16)"),
])
def test_malformed_model_files_are_refused(small_mnist, tmp_path, capsys, change, message):
    data_dir, _, _ = small_mnist
    model = tmp_path / "m.npz"
    run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--hidden", "16",
             "--log-file", str(tmp_path / "l.txt"), "--save-model", str(model))
    with np.load(model) as f:
        stored = dict(f)
    stored.update(change)
    np.savez(model, **stored)
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--load-model", str(model),
                            "--log-file", str(tmp_path / "l2.txt"))
    assert code == 1 and message in err and "Traceback" not in err


def test_exploding_loss_stops_with_advice(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    log = tmp_path / "log.txt"
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--optimizer", "momentum", "--sgd-lr", "1e6",
                            "--schedule", "constant", "--log-file", str(log))
    assert code == 1 and "lower the learning rate" in err and "Warning" not in err
    assert not log.exists()


def test_ctrl_c_stops_cleanly(small_mnist, tmp_path, capsys, monkeypatch):
    data_dir, _, _ = small_mnist
    log = tmp_path / "log.txt"
    log.write_text("old\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(m, "train_epoch", interrupted)
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--log-file", str(log))
    assert code == 130 and "Interrupted" in err
    assert log.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["data", "log.txt"]


def test_script_runs_as_a_program(tmp_path):
    data_dir = tmp_path / "data"
    write_mnist(str(data_dir), n_train=120, n_test=40, gz=True, dotted=True)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_net.py"), "--data-dir", str(data_dir),
                             "--epochs", "1", "--log-file", "out.txt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Full MNIST test accuracy:" in result.stdout
    assert "\r" not in result.stdout                         # no progress line when not a terminal
    assert np.loadtxt(tmp_path / "out.txt", dtype=int).shape == (40, 2)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_net.py"), "--epochs", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
