"""The command line end to end, on a small dataset the tests write: training, the log,
saving and loading models (this version's files, the previous version's, damaged ones)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import mnist_net as m
from conftest import ROOT, write_mnist

CUSTOM = "conv8 relu conv16 relu pool dropout0.25 fc64 relu fc10"
# what a model file holds besides the network's state_dict
FILE_EXTRAS = {"spec", "dataset", "input_mean", "input_std", "config"}


@pytest.fixture(autouse=True)
def mnist_scaling(monkeypatch):
    """Each test starts with MNIST's input scaling and leaves the module's as it found it:
    run() sets the scaling of its data set (or of the model it loads) for the whole process."""
    monkeypatch.setattr(m, "input_mean", m.PIXEL_MEAN)
    monkeypatch.setattr(m, "input_std", m.PIXEL_STD)


def run_main(capsys, *argv):
    code = m.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def log_rows(path):
    """The 'prediction actual' rows of a predictions log, without the '#' header."""
    return [line for line in open(path).read().splitlines() if not line.startswith("#")]


# --- a forward pass written from PyTorch's layer order, reading the saved file alone ---------
# Each network as nn.Sequential would list it: (kind, state_dict prefix, padding).
PYTORCH_ORDER = {
    "seed": [("conv", "conv1", 0), ("relu",), ("pool",), ("flatten",), ("fc", "fc1"), ("relu",), ("fc", "fc2")],
    "deep": [("conv", "conv1", 1), ("bn", "bn1"), ("relu",), ("pool",),
             ("conv", "conv2", 1), ("bn", "bn2"), ("relu",), ("pool",),
             ("flatten",), ("fc", "fc1"), ("relu",), ("fc", "fc2")],
    CUSTOM: [("conv", "conv1", 0), ("relu",), ("conv", "conv2", 0), ("relu",), ("pool",),
             ("flatten",), ("fc", "fc1"), ("relu",), ("fc", "fc2")],        # dropout: off in eval
}


def forward_from_file(stored, order, images_u8):
    """Logits (N, 10) in float64 from the arrays of a model file, in evaluation mode."""
    h = (images_u8[:, None].astype(np.float64) / 255 - stored["input_mean"]) / stored["input_std"]
    for kind, *args in order:
        if kind == "conv":
            w, b = stored[args[0] + ".weight"], stored[args[0] + ".bias"]
            p, K = args[1], w.shape[2]
            h = np.pad(h, ((0, 0), (0, 0), (p, p), (p, p)))
            windows = sliding_window_view(h, (K, K), axis=(2, 3))              # (N, C, Ho, Wo, K, K)
            h = np.einsum("nchwij,fcij->nfhw", windows, w) + b[:, None, None]
        elif kind == "bn":
            s = lambda name: stored[f"{args[0]}.{name}"][:, None, None]
            h = s("weight") * (h - s("running_mean")) / np.sqrt(s("running_var") + 1e-5) + s("bias")
        elif kind == "relu":
            h = np.maximum(h, 0)
        elif kind == "pool":
            N, C, H, W = h.shape
            h = h[:, :, :H // 2 * 2, :W // 2 * 2].reshape(N, C, H // 2, 2, W // 2, 2).max(axis=(3, 5))
        elif kind == "flatten":
            h = h.reshape(len(h), -1)                                          # (channel, row, column)
        else:
            h = h @ stored[args[0] + ".weight"].T + stored[args[0] + ".bias"]
    return h


def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# --- end to end ------------------------------------------------------------------------------
def test_end_to_end_writes_log_and_model(small_mnist, tmp_path, capsys):
    data_dir, _, (test_x, test_y) = small_mnist
    log, model = tmp_path / "log.txt", tmp_path / "model.npz"
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "2", "--batch-size", "32",
                              "--log-file", str(log), "--save-model", str(model))
    assert code == 0, err
    assert 'network --net "conv8 relu pool fc128 relu fc10"' in out and "174,554 parameters in all" in out
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
    assert "optimizer=dual" in text and 'net="conv8 relu pool fc128 relu fc10"' in text
    assert model.exists()


def test_deep_network_end_to_end(small_mnist, tmp_path, capsys):
    data_dir, _, (_, test_y) = small_mnist
    log = tmp_path / "log.txt"
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--net", "deep", "--epochs", "1", "--limit", "300",
                              "--log-file", str(log))
    assert code == 0, err
    assert f'network --net "{m.PRESETS["deep"]}"' in out and "207,018 parameters in all" in out
    assert "bn (bn2)" in out and "(32, 7, 7)" in out
    assert "Training on 300 images (5 steps of 64 per epoch)" in out and "epoch 1/1" in out
    table = np.loadtxt(log, dtype=int)
    np.testing.assert_array_equal(table[:, 1], test_y)
    assert (table[:, 0] == table[:, 1]).mean() > 0.3         # 3 steps: well above chance (0.1)
    assert f'net="{m.PRESETS["deep"]}"' in log.read_text()


def test_quiet_run_prints_no_description(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--quiet",
                            "--log-file", str(tmp_path / "l.txt"))
    assert code == 0 and "network --net" not in out and "Full MNIST test accuracy:" in out


def test_same_seed_gives_identical_log_rows(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    rows = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        log = tmp_path / f"{name}.txt"
        run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--seed", seed, "--net", CUSTOM,
                 "--optimizer", "adam", "--log-file", str(log), "--save-model", str(tmp_path / f"{name}.npz"))
        rows.append(log_rows(log))
    assert rows[0] == rows[1]
    a, b, c = (load_npz(tmp_path / f"{name}.npz") for name in "abc")
    np.testing.assert_array_equal(a["fc1.weight"], b["fc1.weight"])        # dropout masks included
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "momentum"])
def test_single_optimizers_and_constant_schedule_run(small_mnist, tmp_path, capsys, optimizer):
    data_dir, _, _ = small_mnist
    log = tmp_path / "log.txt"
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "2", "--optimizer", optimizer,
                              "--schedule", "constant", "--limit", "200", "--log-file", str(log), "--quiet")
    assert code == 0, err
    assert "epoch" not in out and "Full MNIST test accuracy:" in out
    text = log.read_text()
    assert f"optimizer={optimizer}" in text and "limit=200" in text
    assert ("weight_decay=0.01" in text) == (optimizer == "adamw")


def test_limit_trains_on_first_n(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--limit", "64",
                            "--log-file", str(tmp_path / "l.txt"))
    assert code == 0 and "Training on 64 images" in out


# --- saving and loading ----------------------------------------------------------------------
@pytest.mark.parametrize("net, extra", [("seed", ["--filters", "3", "--hidden", "16"]), ("deep", []), (CUSTOM, [])])
def test_save_then_load_round_trip(small_mnist, tmp_path, capsys, net, extra):
    data_dir, _, (test_x, _) = small_mnist
    model, log1, log2 = tmp_path / "m.npz", tmp_path / "a.txt", tmp_path / "b.txt"
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--net", net, *extra, "--epochs", "1",
                            "--limit", "300", "--log-file", str(log1), "--save-model", str(model))
    assert code == 0, err
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--load-model", str(model), "--log-file", str(log2))
    assert code == 0, err
    assert "epoch" not in out and "Training" not in out
    assert log_rows(log1) == log_rows(log2)
    spec = m.parse_args(["--net", net, *extra]).net
    assert f'loaded from {model}: net="{spec}"' in log2.read_text()

    # the file: exactly the network's state_dict, its spec, the input scaling and the config
    stored = load_npz(model)
    loaded = m.load_model(str(model))
    assert set(stored) == set(loaded.state) | FILE_EXTRAS
    assert str(stored["dataset"]) == "mnist"
    assert stored["input_mean"] == np.float32(m.PIXEL_MEAN) and stored["input_std"] == np.float32(m.PIXEL_STD)
    assert str(stored["spec"]) == spec == loaded.spec
    assert f'net="{spec}"' in str(stored["config"]) and "epochs=1" in str(stored["config"])
    for name, a in loaded.state.items():
        np.testing.assert_array_equal(a, stored[name])
    if net == "deep":
        for bn in ("bn1", "bn2"):
            assert stored[f"{bn}.num_batches_tracked"] == 5                # 300 images, 5 steps of 64 (deep's batch)
            assert stored[f"{bn}.num_batches_tracked"].dtype == np.int64
            assert stored[f"{bn}.running_var"].shape == stored[f"{bn}.weight"].shape
            assert not np.allclose(stored[f"{bn}.running_mean"], 0)

    # names and layouts are PyTorch's: a forward pass written from them alone predicts the log
    order = PYTORCH_ORDER["seed" if net == "seed" else net]
    logits = forward_from_file(stored, order, test_x)
    probs = m.predict_proba(loaded, test_x)
    np.testing.assert_allclose(probs, np.exp(m.log_softmax(logits)), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(axis=1), np.loadtxt(log2, dtype=int)[:, 0])


def save_as_previous_version(new_file, old_file):
    """The file the version before --net wrote: conv.*, fc1.*, fc2.*, input_mean, input_std,
    config (no spec), as its save_model did."""
    new = load_npz(new_file)
    arrays = {"conv.weight": new["conv1.weight"], "conv.bias": new["conv1.bias"]}
    arrays.update({name: new[name] for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")})
    arrays["input_mean"] = np.float32(m.PIXEL_MEAN)
    arrays["input_std"] = np.float32(m.PIXEL_STD)
    arrays["config"] = np.array("epochs=1 batch_size=128 optimizer=dual lr=0.003 sgd_lr=0.01 momentum=0.9 "
                                "schedule=cosine seed=0 filters=3 hidden=16 limit=None")
    np.savez(old_file, **arrays)
    return arrays


def test_file_of_the_previous_version_loads_as_the_seed_network(small_mnist, tmp_path, capsys):
    data_dir, _, (test_x, _) = small_mnist
    new, old, log1, log2 = (tmp_path / name for name in ("new.npz", "old.npz", "a.txt", "b.txt"))
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--filters", "3", "--hidden", "16",
                            "--log-file", str(log1), "--save-model", str(new))
    assert code == 0, err
    arrays = save_as_previous_version(new, old)
    net = m.load_model(str(old))
    assert net.spec == "conv3 relu pool fc16 relu fc10"          # its widths read off the arrays
    np.testing.assert_array_equal(net.state["conv1.weight"], arrays["conv.weight"])
    np.testing.assert_array_equal(net.state["conv1.bias"], arrays["conv.bias"])
    np.testing.assert_array_equal(net.state["fc2.weight"], arrays["fc2.weight"])
    logits = forward_from_file(arrays | {"conv1.weight": arrays["conv.weight"], "conv1.bias": arrays["conv.bias"]},
                               PYTORCH_ORDER["seed"], test_x)
    np.testing.assert_allclose(m.predict_proba(net, test_x), np.exp(m.log_softmax(logits)), rtol=1e-4, atol=1e-5)
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--load-model", str(old), "--log-file", str(log2))
    assert code == 0, err
    assert log_rows(log1) == log_rows(log2)
    assert 'net="conv3 relu pool fc16 relu fc10"' in log2.read_text()


def refused_model(capsys, data_dir, model, log):
    """Run --load-model on a bad file: it must stop with exit 1 and one line naming the file."""
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--load-model", str(model), "--log-file", str(log))
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"error: {model}: "), err
    assert "Traceback" not in err and "Full MNIST" not in out
    assert not log.exists()
    return err


def test_damaged_model_file_is_refused(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    log = tmp_path / "l.txt"
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    assert "not a readable .npz model file" in refused_model(capsys, data_dir, bad, log)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    err = refused_model(capsys, data_dir, other, log)
    assert "not an mnist_net model" in err and "missing spec, input_mean, input_std" in err


def change(name, value):
    return lambda stored: stored.update({name: value})


def drop(name):
    return lambda stored: stored.pop(name)


BN_NET = "conv3 bn relu pool fc16 relu fc10"


@pytest.mark.parametrize("edit, message", [
    (drop("fc2.bias"), "missing fc2.bias for the network"),
    (drop("bn1.num_batches_tracked"), "missing bn1.num_batches_tracked"),
    (drop("spec"), "missing spec"),
    (change("fc2.weight", np.zeros((10, 17), np.float32)), "fc2.weight has shape (10, 17), expected (10, 16)"),
    (change("conv1.bias", np.float32(1)), "conv1.bias has shape (), expected (3,)"),
    (change("bn1.running_mean", np.zeros((3, 1), np.float32)), "bn1.running_mean has shape (3, 1)"),
    (change("fc1.bias", np.full(16, np.nan, np.float32)), "fc1.bias is not an array of finite float"),
    (change("bn1.running_var", np.array([1, np.inf, 1], np.float32)), "bn1.running_var is not an array of finite"),
    (change("conv1.weight", np.array(["a"])), "conv1.weight is not an array of finite float"),
    (change("bn1.num_batches_tracked", np.float64(3)), "bn1.num_batches_tracked is not an array of finite int"),
    (change("spec", np.array("conv3 bn relu pooll fc16 relu fc10")), "spec is not valid ('pooll': unknown layer"),
    (change("spec", np.array("conv3 bn relu pool fc16 relu fc12")), "spec is not valid ('fc12' is last"),
    (change("spec", np.array("")), "spec is not valid (the network is empty"),
    (change("spec", np.array("conv3 bn relu pool fc10")), "fc1.weight has shape (16, 507), expected (10, 507)"),
    (change("input_mean", np.zeros(3, np.float32)), "input_mean is not a finite number"),
    (change("input_std", np.float32(np.nan)), "input_std is not a finite number"),
    (change("input_std", np.float32(0.0)), "input_std is 0.0, not a positive number"),
])
def test_malformed_model_files_are_refused(small_mnist, tmp_path, capsys, edit, message):
    data_dir, _, _ = small_mnist
    model = tmp_path / "m.npz"
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--net", BN_NET, "--epochs", "1", "--limit", "100",
                            "--log-file", str(tmp_path / "l.txt"), "--save-model", str(model))
    assert code == 0, err
    stored = load_npz(model)
    edit(stored)
    np.savez(model, **stored)
    err = refused_model(capsys, data_dir, model, tmp_path / "l2.txt")
    assert message in err


@pytest.mark.parametrize("edit, message", [
    (drop("fc2.weight"), "missing fc2.weight"),
    (change("fc2.weight", np.zeros((10, 17), np.float32)), "fc2.weight has shape (10, 17), expected (10, 16)"),
    (change("conv.bias", np.float32(1)), "conv"),                       # no width to read off
    (change("fc1.bias", np.zeros((), np.float32)), "fc1"),
    (change("fc1.bias", np.full(16, np.inf, np.float32)), "fc1.bias is not an array of finite"),
])
def test_malformed_files_of_the_previous_version_are_refused(small_mnist, tmp_path, capsys, edit, message):
    data_dir, _, _ = small_mnist
    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--filters", "3", "--hidden", "16", "--limit", "100",
             "--log-file", str(tmp_path / "l.txt"), "--save-model", str(new))
    stored = save_as_previous_version(new, old)
    edit(stored)
    np.savez(old, **stored)
    err = refused_model(capsys, data_dir, old, tmp_path / "l2.txt")
    assert message in err


# --- refusing bad input, stopping cleanly ----------------------------------------------------
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
    (["--weight-decay", "-0.01"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
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


def test_weight_decay_zero_is_allowed():
    assert m.parse_args(["--optimizer", "adamw", "--weight-decay", "0"]).weight_decay == 0.0


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
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--log-file", str(log),
                            "--save-model", str(tmp_path / "m.npz"))
    assert code == 130 and "Interrupted" in err
    assert log.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["data", "log.txt"]


def test_script_runs_as_a_program(tmp_path):
    data_dir = tmp_path / "data"
    write_mnist(str(data_dir), n_train=120, n_test=40, gz=True, dotted=True)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_net.py"), "--data-dir", str(data_dir),
                             "--epochs", "1", "--net", "conv4 bn relu pool fc10", "--log-file", "out.txt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'network --net "conv4 bn relu pool fc10"' in result.stdout
    assert "Full MNIST test accuracy:" in result.stdout
    assert "\r" not in result.stdout                         # no progress line when not a terminal
    assert np.loadtxt(tmp_path / "out.txt", dtype=int).shape == (40, 2)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_net.py"), "--epochs", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
