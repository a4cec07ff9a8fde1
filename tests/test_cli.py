"""The command line end to end, on a small dataset the tests write: training, the log,
saving and loading models (this version's files, the previous version's, damaged ones)."""
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import mnist_net as m
from conftest import ROOT, write_mnist
from tools import command_line as cl
from tools.model_files import load_model

CUSTOM = "conv8 relu conv16 relu pool dropout0.25 fc64 relu fc10"
# what a model file holds besides the network's state_dict
FILE_EXTRAS = {"spec", "dataset", "input_mean", "input_std", "config"}


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
    assert "Training on 300 images (5 steps of 64" in out and "epoch 1/1" in out
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
    spec = cl.parse_args(["--net", net, *extra]).net
    assert f'loaded from {model}: net="{spec}"' in log2.read_text()

    # the file: exactly the network's state_dict, its spec, the input scaling and the config
    stored = load_npz(model)
    loaded = load_model(str(model))
    assert set(stored) == set(loaded.state) | FILE_EXTRAS
    assert str(stored["dataset"]) == "mnist"
    assert stored["input_mean"] == m.PIXEL_MEAN and stored["input_std"] == m.PIXEL_STD      # exactly
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


def test_to_pytorch_loads_a_saved_model_into_the_modules_it_builds(small_mnist, tmp_path, capsys, monkeypatch):
    """tools/to_pytorch.py with torch stood in by a mock (it need not be installed): every
    module it builds gets exactly its part of the file's state_dict; the scaling is the file's."""
    from unittest import mock
    from tools import to_pytorch
    data_dir, _, _ = small_mnist
    model = tmp_path / "m.npz"
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--net", BN_NET, "--epochs", "1", "--limit", "100",
                            "--log-file", str(tmp_path / "l.txt"), "--save-model", str(model))
    assert code == 0, err
    torch = mock.MagicMock()
    torch.from_numpy.side_effect = lambda a: ("tensor", a)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.nn", torch.nn)
    modules = []

    def maker(name):
        def make(*args, **kwargs):
            modules.append((name, mock.MagicMock()))
            return modules[-1][1]
        return make

    for name in ("Conv2d", "BatchNorm2d", "BatchNorm1d", "Linear"):
        getattr(torch.nn, name).side_effect = maker(name)
    _, mean, std = to_pytorch.load(str(model))
    assert (mean, std) == (m.PIXEL_MEAN, m.PIXEL_STD)
    assert [kind for kind, _ in modules] == ["Conv2d", "BatchNorm2d", "Linear", "Linear"]
    stored = load_npz(model)
    for (kind, module), prefix in zip(modules, ["conv1", "bn1", "fc1", "fc2"]):
        (state,), _ = module.load_state_dict.call_args
        assert sorted(state) == sorted(k.split(".", 1)[1] for k in stored if k.startswith(prefix + "."))
        for key, (_, value) in state.items():
            np.testing.assert_array_equal(value, stored[f"{prefix}.{key}"])


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
    net = load_model(str(old))
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
    assert "not a model file saved by mnist_net" in refused_model(capsys, data_dir, bad, log)
    one_array = tmp_path / "one.npy"
    np.save(one_array, np.zeros(3))
    assert "not a model file saved by mnist_net" in refused_model(capsys, data_dir, one_array, log)
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
    (change("spec", np.array("conv3 bn relu pooll fc16 relu fc10")), "spec is not valid ('pooll': not a layer"),
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
@pytest.fixture
def no_work(monkeypatch):
    """Any data reading, fetching, loading or training turned into a test failure."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    for name in ("load_mnist", "train", "choose_layers"):
        monkeypatch.setattr(m, name, forbidden)
    for name in ("fetch_missing_files", "load_model", "download_only"):
        monkeypatch.setattr(cl, name, forbidden)


def refused(capsys, argv):
    """(exit code, stdout, stderr lines) of main(argv), which must stop while checking the arguments."""
    with pytest.raises(SystemExit) as e:
        m.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return e.value.code, out, err.splitlines()


# values argparse itself refuses: its usage block, then one line naming the flag and why
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
    (["--seed", "-1"], "--seed"),
])
def test_bad_values_are_refused_before_any_work(capsys, no_work, argv, flag):
    code, out, err = refused(capsys, argv)
    assert code == 2 and out == ""
    assert err[0].startswith("usage:")
    assert err[-1].startswith("mnist_net.py: error: ") and flag in err[-1]   # the usage names every flag


# files and folders the command line checks itself: one line, naming the flag and what to do
@pytest.mark.parametrize("argv, words", [
    (["--log-file", "/no/such/folder/log.txt"], "--log-file /no/such/folder/log.txt: folder /no/such/folder "
                                                "does not exist"),
    (["--log-file", "."], "--log-file '.': give a file name, not a folder"),
    (["--log-file", ""], "--log-file '': give a file name"),
    (["--save-model", "/no/such/folder/m.npz"], "--save-model /no/such/folder/m.npz: folder"),
    (["--save-model", "model.pkl"], "--save-model model.pkl: the file name must end in .npz"),
    (["--data-dir", __file__], f"--data-dir {__file__}: is a file, not a folder"),
    (["--load-model", "/no/such/model.npz"], "--load-model /no/such/model.npz: no such file; train and "
                                             "save one with --save-model"),
    (["--load-model", os.path.dirname(__file__)], "is a folder; give a model file saved with --save-model"),
    (["--predict", "x.pgm"], "--predict needs --load-model"),
    (["--plot", "out.jpg"], "--plot out.jpg: the plot is a PNG picture; give a name ending in .png"),
    (["--plot", "out"], "--plot out: the plot is a PNG picture"),
])
def test_bad_files_are_refused_in_one_line_before_any_work(capsys, no_work, argv, words):
    code, out, err = refused(capsys, argv)
    assert code == 2 and out == ""
    assert len(err) == 1, err                                   # no usage block
    assert err[0].startswith("mnist_net.py: error: ") and words in err[0]


@pytest.mark.parametrize("argv", [
    ["--predict", "x.pgm"], ["--diagnose", "--trace"], ["--diagnose", "--save-model", "x.npz"],
    ["--filters", "4", "--net", "deep"], ["--load-model", "m.npz", "--predict", "x.pgm", "--trace"],
    ["--load-model", "m.npz", "--predict", "x.pgm", "--why", "3"], ["--load-model", "m.npz", "--history", "h.csv"],
    ["--load-model", "missing.npz"], ["--load-model", "."], ["--plot", "curves.jpg"], ["--save-model", "m.pt"],
    ["--log-file", "no_folder/log.txt"], ["--net", "conv8 relu pool fc10 relu"], ["--net", "Conv8 relu pool fc10"],
])
def test_every_refusal_of_short_arguments_fits_100_columns(capsys, no_work, tmp_path, monkeypatch, argv):
    """The one-line refusals: with the short names a user types, each fits 100 columns."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.npz").write_bytes(b"")
    code, _, err = refused(capsys, argv)
    assert code == 2 and len(err) == 1, err
    assert len(err[0]) <= 100, err[0]


def test_a_missing_model_says_to_train_and_save_one_in_one_line(capsys, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = refused(capsys, ["--load-model", "missing.npz"])
    assert code == 2 and len(err) == 1
    assert "missing.npz: no such file" in err[0] and "--save-model" in err[0] and len(err[0]) <= 100


def test_a_folder_to_predict_is_called_a_folder(capsys, no_work, tmp_path):
    model = tmp_path / "m.npz"
    model.write_bytes(b"")                                      # checked for existence only, not read
    for folder in (".", str(tmp_path)):
        code, _, err = refused(capsys, ["--load-model", str(model), "--predict", folder])
        assert code == 2 and len(err) == 1
        assert f"--predict {folder}: is a folder; give picture files" in err[0] and "no such file" not in err[0]


@pytest.fixture
def without(monkeypatch):
    """without(name): make `import name` fail as if the package were not installed."""
    return lambda name: monkeypatch.setitem(sys.modules, name, None)


def pip_in_hint(line, package):
    """The pip the hint names, checked to be this Python's own (the venv's, when in one)."""
    words = line.split()
    k = words.index("install")
    assert words[k + 1] == package and words[k - 1].endswith("pip")
    if sys.prefix != sys.base_prefix:                           # in a venv: its pip, which exists
        pip = os.path.abspath(words[k - 1])
        assert pip == os.path.join(sys.prefix, "bin", "pip") and os.path.isfile(pip)
    return words[k - 1]


def as_in_the_readme(line, pip):
    """line as a learner sees it, whose venv is the README's .venv in the project (a venv
    elsewhere, as in CI's runs on other Pythons, is named by its whole path)."""
    return line.replace(pip, os.path.join(".venv", "bin", "pip"))


def test_plot_without_matplotlib_is_refused_before_any_work(capsys, no_work, without):
    without("matplotlib")
    code, out, err = refused(capsys, ["--epochs", "1", "--plot", "curves.png"])
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith("mnist_net.py: error: --plot needs matplotlib: ")
    assert len(as_in_the_readme(err[0], pip_in_hint(err[0], "matplotlib"))) <= 100


def test_plot_with_matplotlib_is_accepted(monkeypatch):
    """The check above can pass: with matplotlib importable, --plot x.png goes through."""
    monkeypatch.setattr(cl, "has_module", lambda name: True)
    assert cl.parse_args(["--plot", "x.png"]).plot == "x.png"


def test_png_without_pillow_is_refused_before_any_work(capsys, no_work, without, tmp_path):
    without("PIL")
    model = tmp_path / "m.npz"
    model.write_bytes(b"")
    for picture in ("seven.png", "SEVEN.JPG", "seven.jpeg"):
        code, out, err = refused(capsys, ["--load-model", str(model), "--predict", "three.pgm", picture])
        assert code == 2 and out == "" and len(err) == 1
        assert err[0].startswith(f"mnist_net.py: error: --predict {picture} needs Pillow: ")
        assert len(as_in_the_readme(err[0], pip_in_hint(err[0], "Pillow"))) <= 100
    # PGM and .npy need no Pillow
    assert cl.parse_args(["--load-model", str(model), "--predict", "a.pgm", "b.npy"]).predict == ["a.pgm", "b.npy"]


def test_a_text_file_is_not_a_model_and_no_pickle_advice(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes on the run: 98.7% after 5 epochs\n")
    err = refused_model(capsys, data_dir, notes, tmp_path / "log.txt")
    assert "not a model file saved by mnist_net" in err
    assert "pickle" not in err.lower() and "numpy" not in err.lower()


@pytest.mark.parametrize("columns", ["80", "250"])
def test_help_ends_with_examples_and_fits_100_columns(capsys, monkeypatch, tmp_path, columns):
    monkeypatch.setenv("COLUMNS", columns)                  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as e:
        m.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert "(default: False)" not in text and "(default: True)" not in text
    examples = text[text.index("\nexamples:\n"):].splitlines()[2:]
    assert len(examples) >= 4 and all(line.strip().startswith("python3 mnist_net.py") for line in examples)
    assert text.rstrip().endswith(examples[-1].rstrip())           # the examples come last
    for flag in ("--save-model", "--load-model", "--plain", "--plot", "--trace", "--gradcheck"):
        assert flag in text
    # every example is a command line that parses (with a model file there, Pillow and matplotlib)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.npz").write_bytes(b"")
    monkeypatch.setattr(cl, "has_module", lambda name: True)
    for line in examples:
        command = re.split(r"\s{2,}", line.strip())[0]         # the words before the comment
        words = shlex.split(command)
        assert words[:2] == ["python3", "mnist_net.py"]
        assert cl.parse_args(words[2:]).net


@pytest.fixture(scope="module")
def trained_here(tmp_path_factory):
    """A folder where a run trained and saved a model, and wrote its log to the default
    mnist_test_log.txt: (folder, data folder, model, the log's text)."""
    folder = tmp_path_factory.mktemp("trained_here")
    data = folder / "data"
    write_mnist(str(data), n_train=100, n_test=30)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = m.main(["--data-dir", str(data), "--epochs", "1", "--net", "conv4 relu pool fc16 relu fc10",
                           "--save-model", "m.npz"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return folder, data, folder / "m.npz", (folder / m.LOG_FILE).read_text()


def stand_in_for_maps_and_saliency(monkeypatch):
    """--show-maps and --why drawn by a stand-in that records its calls (the drawings have
    their own tests in test_maps_and_saliency.py; here only the log matters)."""
    from tools import maps_and_saliency
    shown = []
    monkeypatch.setattr(maps_and_saliency, "show", lambda args, net, *rest: shown.append(args) or 0)
    return shown


@pytest.mark.parametrize("flags", [["--show-maps", "0"], ["--why", "1"], ["--trace"], ["--trace", "2"],
                                   ["--plot", "p.png"], ["--show-filters"], ["--show-mistakes", "2"],
                                   ["--why", "0", "--quiet"]])
def test_looking_inside_a_loaded_model_keeps_the_log(trained_here, capsys, monkeypatch, flags):
    folder, data, model, log = trained_here
    monkeypatch.chdir(folder)
    monkeypatch.setattr(cl, "has_module", lambda name: True)            # --plot: as if matplotlib were here
    monkeypatch.setattr(cl.reports, "plot", lambda path, *a, **k: open(path, "wb").close() or True)
    shown = stand_in_for_maps_and_saliency(monkeypatch)
    code, out, err = run_main(capsys, "--data-dir", str(data), "--load-model", str(model), *flags)
    assert len(shown) == ("--show-maps" in flags or "--why" in flags)
    assert code == 0, err
    assert (folder / m.LOG_FILE).read_text() == log                     # the training run's log, untouched
    assert "Wrote 30 predictions" not in out
    assert ("No log written: looking inside leaves mnist_test_log.txt as it was" in out) == ("--quiet" not in flags)
    assert sorted(os.listdir(folder)) == sorted(["data", "m.npz", m.LOG_FILE] + ["p.png"] * ("--plot" in flags))
    # asked for, the log is written where --log-file says, with the loaded model's predictions
    code, out, err = run_main(capsys, "--data-dir", str(data), "--load-model", str(model), *flags,
                              "--log-file", "looked.txt")
    assert code == 0, err
    assert "Wrote 30 predictions to looked.txt" in out and "No log written" not in out
    assert log_rows(folder / "looked.txt") == log_rows(folder / m.LOG_FILE)
    assert f"loaded from {model}" in (folder / "looked.txt").read_text()
    assert (folder / m.LOG_FILE).read_text() == log
    os.remove(folder / "looked.txt")
    if "--plot" in flags:
        os.remove(folder / "p.png")


def test_evaluating_a_loaded_model_writes_the_log(trained_here, capsys, monkeypatch, tmp_path):
    """Only looking inside keeps the log: --load-model alone is an evaluation, and writes it."""
    folder, data, model, log = trained_here
    monkeypatch.chdir(tmp_path)
    (tmp_path / m.LOG_FILE).write_text(log)
    code, out, err = run_main(capsys, "--data-dir", str(data), "--load-model", str(model))
    assert code == 0, err
    assert f"Wrote 30 predictions to {m.LOG_FILE}" in out
    text = (tmp_path / m.LOG_FILE).read_text()
    assert text != log and f"loaded from {model}" in text
    assert log_rows(tmp_path / m.LOG_FILE) == [line for line in log.splitlines() if not line.startswith("#")]


def test_training_with_show_maps_writes_the_log(small_mnist, capsys, monkeypatch, tmp_path):
    """A run that trains writes its log, looking inside or not: it is that run's log."""
    data_dir, _, _ = small_mnist
    monkeypatch.chdir(tmp_path)
    shown = stand_in_for_maps_and_saliency(monkeypatch)
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--limit", "64", "--show-maps", "0")
    assert code == 0, err
    assert len(shown) == 1
    assert f"Wrote 100 predictions to {m.LOG_FILE}" in out
    assert len(log_rows(tmp_path / m.LOG_FILE)) == 100


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """A synthetic data set as large as MNIST: 60,000 training and 10,000 test images."""
    data = tmp_path_factory.mktemp("full_size") / "data"
    write_mnist(str(data), n_train=60_000, n_test=10_000)
    return data


@pytest.mark.parametrize("argv", [[], ["--net", "conv2 pool fc10", "--optimizer", "momentum", "--schedule",
                                         "constant", "--show-mistakes", "1", "--show-filters"]])
def test_every_line_of_a_full_size_run_fits_100_columns(full_size, tmp_path, capsys, monkeypatch, argv):
    """Numbers as wide as MNIST's get (the epochs themselves skipped: only what is printed
    matters here); then the model loaded back, from a short path as a user would type it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(m, "train_epoch", lambda net, opt, x, y, batch_size, *rest:
                        (2.302585, 0.1, -(-len(x) // batch_size)))
    code, out, err = run_main(capsys, "--data-dir", str(full_size), "--epochs", "1", *argv, "--save-model", "m.npz")
    assert code == 0, err
    assert "Training on 60000 images (469 steps of 128" in out and "most confused: " in out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    if argv:
        code, out, err = run_main(capsys, "--data-dir", str(full_size), "--load-model", "m.npz", "--show-filters")
        assert code == 0, err
        assert out.startswith("Loaded m.npz: trained on MNIST")
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 100, max(lines, key=len)


def test_weight_decay_zero_is_allowed():
    assert cl.parse_args(["--optimizer", "adamw", "--weight-decay", "0"]).weight_decay == 0.0


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


def test_the_pip_hint_names_the_venvs_scripts_folder_on_windows(monkeypatch, tmp_path):
    """A Windows venv keeps pip in .venv\\Scripts, not .venv/bin: the hint asks sysconfig for the
    venv's scripts folder (here played by a folder named Scripts), relative to where we are."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / ".venv"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "python"))
    monkeypatch.setattr(cl.sysconfig, "get_path", lambda name: str(tmp_path / ".venv" / "Scripts"))
    assert cl.pip_hint("pillow") == os.path.join(".venv", "Scripts", "pip") + " install pillow"
