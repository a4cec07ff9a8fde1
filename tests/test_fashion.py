"""--dataset fashion: its own folder and scaling, class names in every report, the data set
recorded in the model file, and the same one-line errors for damaged files.  Small synthetic
files stand in for Fashion-MNIST (the fetch routes are in test_fetch.py)."""
import contextlib
import gzip
import io
import os
import sys
from unittest import mock

import numpy as np
import pytest

import mnist_net as m
from conftest import idx_labels, write_mnist
from tools import own_digits, reports
from tools.model_files import write_atomically

NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
LABELS_LINE = ("# data set Fashion-MNIST; labels: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, "
               "5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot")
SMALL = ["--epochs", "1", "--filters", "2", "--hidden", "8", "--limit", "40"]   # fast, and it errs


def main(*argv):
    """(exit code, stdout, stderr) of mnist_net's main(); usable in module-scoped fixtures."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = m.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One small Fashion-MNIST run and one MNIST run, each saving its model."""
    tmp = tmp_path_factory.mktemp("runs")
    runs = {}
    for key in ("fashion", "mnist"):
        data = tmp / key
        write_mnist(str(data), n_train=60, n_test=40, seed=3)
        log, model = tmp / f"{key}_log.txt", tmp / f"{key}.npz"
        code, out, err = main("--dataset", key, "--data-dir", data, *SMALL, "--log-file", log,
                              "--save-model", model, "--show-mistakes", "2")
        assert code == 0, err
        runs[key] = dict(data=data, log=log, model=model, out=out, tmp=tmp)
    return runs


# --- the data set's description and its scaling ---------------------------------------------
def test_data_sets_are_described():
    fashion, mnist = m.DATASETS["fashion"], m.DATASETS["mnist"]
    assert fashion.title == "Fashion-MNIST" and fashion.classes == NAMES
    assert fashion.folder == os.path.join(m.DATA_DIR, "fashion")
    assert (fashion.mean, fashion.std) == (0.2860, 0.3530)     # its own training pixels, see the comment
    assert mnist.title == "MNIST" and mnist.classes == tuple("0123456789") and mnist.folder == m.DATA_DIR
    assert (mnist.mean, mnist.std) == (m.PIXEL_MEAN, m.PIXEL_STD)


def test_to_input_uses_the_chosen_scaling():
    images = np.array([[[0] * 28] * 28, [[255] * 28] * 28], np.uint8)
    x = m.to_input(images, 0.2860, 0.3530)
    np.testing.assert_allclose(x[0], -0.2860 / 0.3530, rtol=1e-6)
    np.testing.assert_allclose(x[1], (1 - 0.2860) / 0.3530, rtol=1e-6)


@pytest.mark.parametrize("plain", [[], ["--plain"]])
def test_training_and_testing_use_fashions_scaling(tmp_path, monkeypatch, plain):
    """The network carries its data set's mean and std (net.mean, net.std): every batch of
    training and of the test evaluation is scaled with Fashion-MNIST's, on either path."""
    seen = []
    real_epoch, real_input = m.train_epoch, m.to_input

    def spy_epoch(net, *args, **kwargs):
        seen.append(("net", net.mean, net.std))
        return real_epoch(net, *args, **kwargs)

    def spy_input(images, *scaling):
        seen.append(("batch",) + scaling)
        return real_input(images, *scaling)

    monkeypatch.setattr(m, "train_epoch", spy_epoch)
    monkeypatch.setattr(m, "to_input", spy_input)
    write_mnist(str(tmp_path / "data"), n_train=30, n_test=10)
    code, _, err = main("--dataset", "fashion", "--data-dir", tmp_path / "data", *SMALL, *plain,
                        "--log-file", tmp_path / "log.txt")
    assert code == 0, err
    assert seen[0] == ("net", 0.2860, 0.3530)
    batches = [entry for entry in seen if entry[0] == "batch"]
    assert len(batches) >= 2 and set(batches) == {("batch", 0.2860, 0.3530)}   # training and the test set


# --- names in every report ------------------------------------------------------------------
def test_fashion_run_names_its_classes(runs):
    out = runs["fashion"]["out"]
    assert "Full Fashion-MNIST test accuracy:" in out and "Full MNIST" not in out
    assert "per-class accuracy: T-shirt/top:" in out and "  Ankle boot:" in out
    assert "confusion matrix (rows: actual, columns: predicted, numbered as the rows)" in out
    rows = [line for line in out.splitlines() if line[:1].isdigit() and line[2:3].isalpha()]
    assert [r[:14].rstrip() for r in rows] == [f"{i} {name}" for i, name in enumerate(NAMES)]
    pairs = report_items(out.splitlines(), "most confused: ", ", ")
    assert pairs and all(" taken for " in pair for pair in pairs)
    for pair in pairs:
        truth, rest = pair.split(" taken for ")
        assert truth in NAMES and rest.rsplit(" ", 1)[0] in NAMES
    mistakes = [line for line in out.splitlines() if line.startswith("test image ")]
    assert len(mistakes) == 2
    for line in mistakes:
        predicted = line.split("predicted ")[1].split(" (p=")[0]
        actual = line.split("actually ")[1].split(" (p=")[0]
        assert predicted in NAMES and actual in NAMES and predicted != actual


def test_fashion_log_keeps_integer_rows_and_names_the_labels(runs):
    log = runs["fashion"]["log"]
    header = [line for line in log.read_text().splitlines() if line.startswith("#")]
    assert header[1] == LABELS_LINE
    assert header[3].startswith("# per-class accuracy: T-shirt/top:")
    table = np.loadtxt(log, dtype=int)
    assert table.shape == (40, 2) and table.min() >= 0 and table.max() <= 9


def test_mnist_output_and_log_are_as_before(runs):
    out, log = runs["mnist"]["out"], runs["mnist"]["log"].read_text()
    assert "Full MNIST test accuracy:" in out and "data set" not in log and "T-shirt" not in out + log
    assert "# confusion matrix (rows: actual 0-9, columns: predicted 0-9)" in log
    assert "#      0" in log
    for line in out.splitlines():
        if line.startswith("test image "):
            assert line.split("predicted ")[1][0].isdigit() and line.split("actually ")[1][0].isdigit()


def report_items(lines, head, sep):
    """The items of a report wrapped over several lines: the line starting with head, then the
    lines indented under its first item; each line but the last ends in sep's comma, if any."""
    start = next(k for k, line in enumerate(lines) if line.startswith(head))
    text = lines[start][len(head):]
    for line in lines[start + 1:]:
        if not line.startswith(" " * len(head)) or line[len(head)] == " ":
            break
        assert text.endswith(sep.strip()), (text, line)        # a wrapped line says it goes on
        text += (" " if sep.strip() else sep) + line[len(head):]
    return text.split(sep)


def test_confusion_report_by_name():
    counts = np.diag(np.full(10, 90))
    counts[6, 0], counts[4, 2] = 12, 5
    lines = reports.confusion_report(counts, NAMES)
    assert lines[0].startswith("per-class accuracy: T-shirt/top:100.0%  Trouser:100.0%")
    assert report_items(lines, "per-class accuracy: ", "  ") == [
        "T-shirt/top:100.0%", "Trouser:100.0%", "Pullover:100.0%", "Dress:100.0%", "Coat:94.7%",
        "Sandal:100.0%", "Shirt:88.2%", "Sneaker:100.0%", "Bag:100.0%", "Ankle boot:100.0%"]
    assert lines[1] == " " * 20 + "Sandal:100.0%  Shirt:88.2%  Sneaker:100.0%  Bag:100.0%  Ankle boot:100.0%"
    assert lines[3] == " " * 14 + "".join(f"{d:6d}" for d in range(10))
    assert lines[4] == "0 T-shirt/top" + " " + "    90" + "     0" * 9
    assert lines[-1] == "most confused: Shirt taken for T-shirt/top 12x, Coat taken for Pullover 5x"
    assert len(lines) == 2 + 2 + 10 + 1 and max(len(line) for line in lines[2:]) <= 80


# the widest a report gets: every class at 100.0% or 4-digit counts in the five most confused pairs
WORST = np.diag(np.full(10, 9000))
WORST[[0, 6, 2, 4, 4], [6, 0, 4, 2, 6]] = 1234


@pytest.mark.parametrize("classes", [reports.DIGITS, NAMES], ids=["MNIST", "Fashion-MNIST"])
@pytest.mark.parametrize("counts", [WORST, WORST[::-1, ::-1], np.diag(np.full(10, 1000))],
                         ids=["wide pairs", "reversed", "all right"])
def test_every_report_line_fits_100_columns_and_keeps_every_item(classes, counts):
    lines = reports.confusion_report(counts, classes)
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    per_class = report_items(lines, "per-class accuracy: ", "  ")
    assert [item.rsplit(":", 1)[0] for item in per_class] == list(classes)
    expected = [(t, p, c) for t, p, c in reports.most_confused(counts)]
    pairs = report_items(lines, "most confused: ", ", ") if expected else []
    assert pairs == [f"{classes[t]} taken for {classes[p]} {c}x" for t, p, c in expected]
    # on one line they would take 108 to 118 columns; wrapped, they share two lines evenly (5 and 5)
    assert len(lines[0][len("per-class accuracy: "):].split("  ")) == 5


def test_one_line_report_items_stay_on_one_line():
    assert reports.wrapped("head: ", ["a", "b", "c"], ", ") == ["head: a, b, c"]
    assert reports.wrapped("head: ", ["a" * 40, "b" * 40, "c" * 40], ", ") == [
        "head: " + "a" * 40 + ", " + "b" * 40 + ",", "      " + "c" * 40]


def test_plot_titles_use_class_names(monkeypatch, tmp_path):
    """matplotlib stood in by a mock (it need not be installed): the mistake titles it is given."""
    fake = mock.MagicMock()
    monkeypatch.setitem(sys.modules, "matplotlib", fake)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", fake.pyplot)
    images = np.zeros((3, 28, 28), np.uint8)
    labels, pred = np.array([6, 1, 9]), np.array([0, 1, 7])
    probs = np.full((3, 10), 0.1)
    drawn = reports.plot(str(tmp_path / "p.png"), [], np.zeros((2, 1, 3, 3)), images, labels, pred, probs,
                         write_atomically, out=lambda *a: None, classes=NAMES)
    assert drawn
    ax = fake.pyplot.figure.return_value.add_subplot.return_value
    titles = [c.args[0] for c in ax.set_title.call_args_list]
    assert "Shirt\nread as T-shirt/top\np=0.10" in titles and "Ankle boot\nread as Sneaker\np=0.10" in titles
    fake.reset_mock()
    reports.plot(str(tmp_path / "p.png"), [], np.zeros((2, 1, 3, 3)), images, labels, pred, probs,
                 write_atomically, out=lambda *a: None)
    titles = [c.args[0] for c in ax.set_title.call_args_list]
    assert "6 read as 0\np=0.10" in titles                       # MNIST's titles as before


# --- the model file: data set and scaling recorded, used, and checked -------------------------
def stored(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_model_records_its_data_set_and_scaling(runs):
    fashion, mnist = stored(runs["fashion"]["model"]), stored(runs["mnist"]["model"])
    assert str(fashion["dataset"]) == "fashion" and str(mnist["dataset"]) == "mnist"
    assert fashion["input_mean"] == 0.2860 and fashion["input_std"] == 0.3530
    assert mnist["input_mean"] == m.PIXEL_MEAN and mnist["input_std"] == m.PIXEL_STD


def test_loaded_fashion_model_brings_its_data_set_and_scaling(runs):
    run = runs["fashion"]
    log = run["tmp"] / "reloaded.txt"
    code, out, err = main("--load-model", run["model"], "--data-dir", run["data"], "--log-file", log)
    assert code == 0, err
    assert out.splitlines()[0] == (f"Loaded {run['model']}: trained on Fashion-MNIST, inputs scaled with "
                                   "its mean 0.2860 and std 0.3530")
    assert "Full Fashion-MNIST test accuracy:" in out
    # the same predictions as when it was trained: the same scaling was used
    np.testing.assert_array_equal(np.loadtxt(log, dtype=int), np.loadtxt(run["log"], dtype=int))


@pytest.mark.parametrize("model, dataset, message", [
    ("fashion", "mnist", "trained on Fashion-MNIST, not MNIST; leave out --dataset mnist"),
    ("mnist", "fashion", "trained on MNIST, not Fashion-MNIST; leave out --dataset fashion"),
])
def test_model_of_the_other_data_set_is_refused(runs, tmp_path, model, dataset, message):
    log = tmp_path / "log.txt"
    code, out, err = main("--load-model", runs[model]["model"], "--dataset", dataset,
                          "--data-dir", runs[dataset]["data"], "--log-file", log)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {runs[model]['model']}: ") and message in err
    assert not log.exists()


def test_old_model_file_without_data_set_is_mnist(runs, tmp_path):
    old = tmp_path / "old.npz"
    arrays = stored(runs["mnist"]["model"])
    del arrays["dataset"]
    np.savez(old, **arrays)
    code, out, err = main("--load-model", old, "--data-dir", runs["mnist"]["data"],
                          "--log-file", tmp_path / "l.txt")
    assert code == 0, err
    assert "trained on MNIST" in out and "Full MNIST test accuracy:" in out
    code, _, err = main("--load-model", old, "--dataset", "fashion", "--data-dir", runs["fashion"]["data"],
                        "--log-file", tmp_path / "l2.txt")
    assert code == 1 and "trained on MNIST, not Fashion-MNIST" in err


@pytest.mark.parametrize("change, message", [
    ({"dataset": np.array("cifar10")}, "trained on an unknown data set 'cifar10' (this program knows mnist, fashion)"),
    ({"input_std": np.float32(0)}, "input_std is 0.0, not a positive number"),
    ({"input_mean": np.float32(np.nan)}, "input_mean is not a finite number"),
])
def test_bad_data_set_fields_are_refused(runs, tmp_path, change, message):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **dict(stored(runs["fashion"]["model"]), **change))
    code, _, err = main("--load-model", bad, "--data-dir", runs["fashion"]["data"],
                        "--log-file", tmp_path / "l.txt")
    assert code == 1 and err.count("\n") == 1 and message in err


def test_predict_with_a_fashion_model_says_so_and_names_the_classes(runs, tmp_path):
    shirt = np.zeros((28, 28), np.uint8)
    shirt[4:26, 6:22] = 200
    np.save(tmp_path / "shirt.npy", shirt)
    model = runs["fashion"]["model"]
    code, out, err = main("--load-model", model, "--predict", tmp_path / "shirt.npy", tmp_path / "none.pgm")
    assert code == 1, err                                     # one picture is missing
    lines = out.splitlines()
    assert lines[0] == (f"Model {model}: trained on Fashion-MNIST, inputs scaled with its mean 0.2860 "
                        "and std 0.3530")
    best = lines[1].split("prediction ")[1].split(" (p=")[0]
    second, third = (part.split(" (p=")[0] for part in lines[1].split("), ")[1:])
    assert best in NAMES and second.removeprefix("then ") in NAMES and third in NAMES
    assert lines[2].endswith("none.pgm: error: no such file")
    code, _, err = main("--load-model", model, "--dataset", "mnist", "--predict", tmp_path / "shirt.npy")
    assert code == 1 and "trained on Fashion-MNIST, not MNIST" in err


def test_predict_with_an_mnist_model_prints_only_its_lines(runs, tmp_path):
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    np.save(tmp_path / "one.npy", digit)
    code, out, _ = main("--load-model", runs["mnist"]["model"], "--predict", tmp_path / "one.npy")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'one.npy'}: prediction ")
    assert lines[0].split("prediction ")[1][0].isdigit()


# --- pictures of clothes for --predict --------------------------------------------------------
def test_fashion_like_undoes_a_product_photo():
    """A Fashion-MNIST-like garment, negated to dark on white and enlarged 5 times on a page
    (as Zalando's product photos were), comes back close to the original."""
    rng = np.random.default_rng(0)
    garment = np.zeros((28, 28))
    garment[:, 5:23] = rng.uniform(80, 230, (28, 18))          # spans all 28 rows, 18 columns
    garment[10:, 12:16] = 0                                    # a gap between trouser legs
    photo = np.full((200, 260), 252.0)
    photo[30:170, 65:155] = 255 - own_digits.resize_area(garment[:, 5:23], 140, 90)
    photo += rng.normal(0, 1.5, photo.shape)                   # camera grain
    back = own_digits.fashion_like(photo).astype(float)
    assert back.shape == (28, 28)
    assert np.abs(back - garment).mean() < 6                   # grey levels out of 255
    assert back[:, :4].max() < 10 and back[:, 24:].max() < 10  # the page is gone


def test_fashion_like_keeps_a_dark_background_picture_and_refuses_a_blank_one():
    picture = np.zeros((56, 56))
    picture[:, 10:46] = 180
    back = own_digits.fashion_like(picture)
    assert back[:, 5:23].min() > 170 and back[:, :4].max() == 0
    with pytest.raises(own_digits.ImageError, match="nothing found"):
        own_digits.fashion_like(np.full((40, 40), 240.0))


# --- damaged Fashion-MNIST files: the same one-line errors ---------------------------------------
def damage_truncated(folder):
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return path, "truncated"


def damage_magic(folder):
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes((folder / "t10k-labels-idx1-ubyte").read_bytes())
    return path, "expected 2051: not Fashion-MNIST images"


def damage_label(folder):
    path = folder / "train-labels-idx1-ubyte"
    labels = np.frombuffer(path.read_bytes(), np.uint8, offset=8).copy()
    labels[5] = 10
    path.write_bytes(idx_labels(labels))
    return path, "label 10 at index 5; Fashion-MNIST labels are 0-9"


def damage_gzip(folder):
    path = folder / "t10k-labels-idx1-ubyte"
    gz = folder / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(path.read_bytes())[:-20])
    path.unlink()
    return gz, "not a valid gzip file"


def damage_missing(folder):
    path = folder / "train-labels-idx1-ubyte"
    path.unlink()
    return path, "missing (also looked for"


@pytest.mark.parametrize("damage", [damage_truncated, damage_magic, damage_label, damage_gzip,
                                    damage_missing])
def test_damaged_fashion_file_is_one_line_naming_it(tmp_path, damage):
    data = tmp_path / "data"
    write_mnist(str(data), n_train=30, n_test=10)
    path, what = damage(data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    log = tmp_path / "log.txt"
    code, out, err = main("--dataset", "fashion", "--data-dir", data, "--no-download", "--log-file", log)
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}") and what in err
    if damage is damage_missing:
        assert "put the Fashion-MNIST files there" in err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before        # nothing of the user's changed
    assert not log.exists()
