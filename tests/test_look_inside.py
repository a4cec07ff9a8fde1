"""Looking inside: gradient checks from the command line, reports, pictures of
mistakes and filters, history, plot, and classifying a person's own digits."""
import os
import sys

import numpy as np
import pytest

import mnist_net as m
from tools import own_digits, reports
from drawn_digits import draw_digit, write_pgm


def run_main(capsys, *argv):
    code = m.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- --gradcheck ------------------------------------------------------------------
NETWORK_CHECKS = ("seed ", "own ", "deep ", "net ")    # whole networks; every other check is one layer


def check_lines(out_lines):
    """[(status, check name, error)] from run_gradient_checks' lines, headings and summary left out."""
    rows = []
    for line in out_lines:
        if line.startswith(("ok    ", "FAILED")):
            name, error = line[8:].rsplit(" error ", 1)
            rows.append((line[:6].strip(), name.strip(), float(error)))
    return rows


LAYER_CHECKS = ["conv weight", "conv bias", "conv input", "conv 5x5 pad 2, 2 channels weight",
                "conv 5x5 pad 2, 2 channels input", "conv pad 1, 3 channels input", "relu input",
                "maxpool 5x5 input", "maxpool with ties", "bn on maps weight", "bn on maps input",
                "bn on features bias", "bn on features input", "bn in evaluation input", "dropout 0.4 input",
                "flatten input", "dense weight", "dense bias", "dense input", "softmax cross-entropy"]


def test_gradcheck_passes_on_the_real_code(capsys):
    code, out, _ = run_main(capsys, "--gradcheck")
    assert code == 0
    lines = out.splitlines()
    assert lines[-1] == "all gradient checks within 1e-06"
    assert all(len(line) <= 100 for line in lines)
    rows = check_lines(lines)
    headings = [line for line in lines[:-1] if not line.startswith(("ok    ", "FAILED"))]
    assert headings == ["each layer on its own, in float64, against centred differences:",
                        'whole network seed: --net "conv2 relu pool fc6 relu fc10"',
                        'whole network own: --net "conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10"',
                        'whole network deep: --net "conv16p1 bn relu pool conv32p1 bn relu pool fc128 relu fc10"']
    assert len(rows) == len(lines) - 1 - len(headings)
    assert all(status == "ok" and error <= 1e-6 for status, _, error in rows), rows
    names = {name for _, name, _ in rows}
    for name in LAYER_CHECKS + ["seed conv1.weight", "seed fc2.bias", "seed input", "own bn2.weight",
                                "own conv2.bias (0: batch norm cancels it)", "own input", "deep conv2.weight",
                                "deep bn1.bias", "deep fc1.weight", "deep input"]:
        assert name in names
    assert not any("pool order" in name for name in names)     # the fast path's layouts: tests/test_fast_path.py
    assert "FAILED" not in out


@pytest.mark.parametrize("spec, given", [("conv4 relu pool fc10", "conv4 relu pool fc10"),
                                         ("seed", "conv8 relu pool fc128 relu fc10"),
                                         ("conv3p1 bn relu pool fc8 bn relu fc10", None)])
def test_gradcheck_with_net_checks_the_layers_then_that_network(capsys, spec, given):
    """--gradcheck --net SPEC: the layer checks, then the network as given (seed at its full
    width, not the narrowed one), and none of seed, own and deep."""
    code, out, _ = run_main(capsys, "--gradcheck", "--net", spec)
    assert code == 0
    lines = out.splitlines()
    names = [name for _, name, _ in check_lines(lines)]
    for name in LAYER_CHECKS:
        assert name in names
    network = [name for name in names if name.startswith(NETWORK_CHECKS)]
    net = m.Network(spec, np.random.default_rng(0))
    expected = [f"net {p}" for p in net.params] + ["net input"]
    assert [name.split(" (0")[0] for name in network] == expected    # every parameter, in order
    assert f'whole network net: --net "{given or net.spec}"' in lines
    assert not any(line.startswith("whole network seed") for line in lines)
    if "bn" in spec:
        assert "net conv1.bias (0: batch norm cancels it)" in names and "net fc1.bias (0: batch norm cancels it)" in names
    assert lines[-1] == "all gradient checks within 1e-06"


def test_gradcheck_without_net_from_the_command_line_runs_the_usual_networks(monkeypatch, capsys):
    """Only an explicit --net changes the networks checked: the default --net seed does not."""
    from tools import gradcheck
    seen = []
    monkeypatch.setattr(gradcheck, "run_gradient_checks", lambda out, spec=None: seen.append(spec) or 0)
    assert m.main(["--gradcheck"]) == 0
    assert m.main(["--gradcheck", "--net", "conv4 relu pool fc10"]) == 0
    assert m.main(["--gradcheck", "--net=deep"]) == 0
    assert seen == [None, "conv4 relu pool fc10", m.PRESETS["deep"]]


def test_a_zero_gradient_is_compared_absolutely_and_says_why():
    from tools import gradcheck
    zero, noise = np.zeros(4), np.full(4, 1e-9)
    assert gradcheck.gradient_error("own conv2.bias", zero, noise, cancelled=True) == \
        ("own conv2.bias (0: batch norm cancels it)", pytest.approx(2e-9))
    assert gradcheck.gradient_error("net fc1.bias", zero, noise)[0] == "net fc1.bias (0 for this batch)"
    # not 0 on both sides: relative, so a gradient missing altogether is an error of 1
    assert gradcheck.gradient_error("net fc1.bias", zero, np.full(4, 1e-3)) == ("net fc1.bias", 1.0)


# Broken backward passes, each the kind of mistake a from-scratch layer makes.
def relu_passes_everything(self, dout, need_dx=True):
    return dout


def dense_weight_divided_by_n(self, dout, need_dx=True):
    """The weight gradient divided by the batch size a second time (the loss's mean already did)."""
    dx = REAL["dense"](self, dout, need_dx)
    self.grads["weight"] /= len(dout)
    return dx


def pool_remembers_its_input(self, a, train=True):
    self.a_seen = np.array(a)
    return REAL["pool forward"](self, a, train)


def pool_backward_to_every_tie(self, dout, need_dx=True):
    """The classic bug: every position equal to the window's max gets the gradient."""
    a = self.a_seen
    da = np.zeros_like(a)
    tl, tr, bl, br = m.quarters(a)
    best = np.maximum(np.maximum(tl, tr), np.maximum(bl, br))
    for q, dq in zip((tl, tr, bl, br), m.quarters(da)):
        dq[...] = dout * (q == best)
    return da


def bn_without_the_mean_term(self, dout, need_dx=True):
    """dx = gamma / sqrt(var + eps) * (dout - xhat * dgamma / M): the dbeta / M term forgotten."""
    dx = REAL["bn"](self, dout, need_dx)
    if dx is None or not self.train:
        return dx
    scale = self.params["weight"].reshape(self.per_channel) * self.inv_std
    return dx + scale * self.grads["bias"].reshape(self.per_channel) / self.M


def bn_evaluation_through_the_batch(self, dout, need_dx=True):
    """After an evaluation forward, the training backward (as if the running statistics
    were the batch's and depended on x)."""
    self.train = True
    return REAL["bn"](self, dout, need_dx)


def dropout_without_the_scale(self, dout, need_dx=True):
    return dout * (self.mask != 0) if self.active else dout


def col2im_losing_the_last_kernel_column(dcols, xpad_shape, K):
    """The patches' last column of pixels never gets its gradient back."""
    d = dcols.reshape(-1, K, K, dcols.shape[1]).copy()
    d[:, :, K - 1] = 0
    return REAL["col2im"](d.reshape(dcols.shape), xpad_shape, K)


def flatten_backward_in_the_wrong_order(self, dout, need_dx=True):
    """Unflattened as (N, H, W, C): the right shape, the values in the wrong places."""
    N, C, H, W = self.x_shape
    return dout.reshape(N, H, W, C).transpose(0, 3, 1, 2)


def softmax_forgetting_one_over_n(z, y):
    loss, dz = REAL["softmax"](z, y)
    return loss, dz * len(y)


REAL = {"dense": m.Dense.backward, "pool forward": m.MaxPool.forward, "bn": m.BatchNorm.backward,
        "col2im": m.col2im, "softmax": m.softmax_cross_entropy}
CONV_INPUTS = ("conv input", "conv 5x5 pad 2, 2 channels input", "conv pad 1, 3 channels input")


@pytest.mark.parametrize("patches, must_fail, layer_checks_allowed_to_fail", [
    ([(m.ReLU, "backward", relu_passes_everything)], ["relu input"], ("relu",)),
    ([(m.Dense, "backward", dense_weight_divided_by_n)], ["dense weight"], ("dense weight",)),
    ([(m.MaxPool, "forward", pool_remembers_its_input), (m.MaxPool, "backward", pool_backward_to_every_tie)],
     ["maxpool with ties"], ("maxpool with ties",)),
    ([(m.BatchNorm, "backward", bn_without_the_mean_term)], ["bn on maps input", "bn on features input"],
     ("bn on maps input", "bn on features input")),
    ([(m.BatchNorm, "backward", bn_evaluation_through_the_batch)], ["bn in evaluation input"],
     ("bn in evaluation input",)),
    ([(m.Dropout, "backward", dropout_without_the_scale)], ["dropout 0.4 input"], ("dropout",)),
    ([(m, "col2im", col2im_losing_the_last_kernel_column)], list(CONV_INPUTS), CONV_INPUTS),
    ([(m.Flatten, "backward", flatten_backward_in_the_wrong_order)], ["flatten input"], ("flatten input",)),
    ([(m, "softmax_cross_entropy", softmax_forgetting_one_over_n)], ["softmax cross-entropy"],
     ("softmax cross-entropy",)),
], ids=["relu", "dense weight", "maxpool ties", "bn mean term", "bn evaluation", "dropout scale",
        "conv col2im", "flatten order", "softmax 1/N"])
def test_gradcheck_names_a_broken_backward_pass(monkeypatch, patches, must_fail, layer_checks_allowed_to_fail):
    from tools import gradcheck
    monkeypatch.setattr(gradcheck, "NETWORKS", gradcheck.NETWORKS[:2])    # seed and own: deep takes long
    for target, name, broken in patches:
        monkeypatch.setattr(target, name, broken)
    lines = []
    assert gradcheck.run_gradient_checks(out=lines.append) == 1
    failed = [name for status, name, _ in check_lines(lines) if status == "FAILED"]
    for name in must_fail:
        assert name in failed
    # the other layers' own checks still pass: the report points at the broken layer
    for name in failed:
        assert name.startswith(NETWORK_CHECKS + layer_checks_allowed_to_fail), name
    assert "conv weight" not in failed and "dense bias" not in failed
    summary = " ".join(line.strip() for line in lines[lines.index(next(
        line for line in lines if line.startswith(f"{len(failed)} check(s) above 1e-06: "))):])
    assert summary == f"{len(failed)} check(s) above 1e-06: look at the backward pass of " + ", ".join(failed)
    assert all(len(line) <= 100 for line in lines)


def test_gradcheck_with_net_catches_a_bug_in_that_network_and_keeps_to_100_columns(monkeypatch):
    """A long spec's heading and a long list of failures are wrapped at 100 columns, broken
    at spaces, continued on indented lines; read together they say all of it."""
    from tools import gradcheck
    spec = "conv2 relu conv2 relu conv2 relu conv2 relu pool conv2 relu pool fc8 relu fc8 relu fc8 relu fc10"
    monkeypatch.setattr(m.ReLU, "backward", relu_passes_everything)
    lines = []
    assert gradcheck.run_gradient_checks(lines.append, spec) == 1
    assert all(len(line) <= 100 for line in lines)
    failed = [name for status, name, _ in check_lines(lines) if status == "FAILED"]
    assert {"relu input", "net conv1.weight", "net input"} <= set(failed)
    assert not any(name.startswith(("seed ", "own ", "deep ")) for _, name, _ in check_lines(lines))
    start = next(i for i, line in enumerate(lines) if line.startswith("whole network net: "))
    assert lines[start + 1].startswith("    ")                   # the heading went on to a second line
    heading = " ".join(line.strip() for line in lines[start:start + 2])
    assert heading == f'whole network net: --net "{spec}"'
    summary_start = next(i for i, line in enumerate(lines) if line.startswith(f"{len(failed)} check(s) above"))
    summary = lines[summary_start:]
    assert len(summary) > 1 and all(line.startswith("    ") for line in summary[1:])
    assert " ".join(line.strip() for line in summary).endswith(", ".join(failed))


# --- reports ------------------------------------------------------------------------
def test_confusion_report_and_most_confused_pairs():
    counts = np.diag(np.full(10, 90))
    counts[4, 9], counts[7, 2], counts[3, 5] = 7, 3, 5
    lines = reports.confusion_report(counts)
    assert all(len(line) <= 100 for line in lines)
    matrix = lines.index("confusion matrix (rows: actual 0-9, columns: predicted 0-9)")
    per_class = " ".join(line.strip() for line in lines[:matrix])
    assert lines[0].startswith("per-class accuracy: 0:100.0%")
    assert per_class.split() == ["per-class", "accuracy:", "0:100.0%", "1:100.0%", "2:100.0%", "3:94.7%",
                                 "4:92.8%", "5:100.0%", "6:100.0%", "7:96.8%", "8:100.0%", "9:100.0%"]
    assert lines[-1] == "most confused: 4 taken for 9 7x, 3 taken for 5 5x, 7 taken for 2 3x"
    assert len(lines) == matrix + 2 + 10 + 1


@pytest.fixture
def trained(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    model = tmp_path / "m.npz"
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--log-file",
                            str(tmp_path / "log.txt"), "--save-model", str(model))
    assert code == 0
    return data_dir, str(model), out, tmp_path


def test_report_is_printed_and_logged(trained):
    _, _, out, tmp_path = trained
    assert "per-class accuracy:" in out and "confusion matrix" in out
    log = (tmp_path / "log.txt").read_text()
    assert "# confusion matrix" in log and "# per-class accuracy:" in log


def test_show_mistakes_draws_digits_that_fit_80_columns(small_mnist, tmp_path, capsys):
    data_dir, _, (test_x, test_y) = small_mnist
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--limit", "30",
                            "--filters", "2", "--hidden", "8", "--log-file", str(tmp_path / "l.txt"),
                            "--show-mistakes", "2", "--quiet")
    assert code == 0
    table = np.loadtxt(tmp_path / "l.txt", dtype=int)
    wrong = np.flatnonzero(table[:, 0] != table[:, 1])
    assert len(wrong) >= 2                         # 30 images, 2 filters, 1 epoch: it errs
    lines = out.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("test image ")]
    assert len(headers) == 2
    i = wrong[0]
    assert lines[headers[0]].startswith(f"test image {i}: predicted {table[i, 0]} (p=")
    assert f"actually {table[i, 1]} (p=" in lines[headers[0]]
    drawing = lines[headers[0] + 1:headers[0] + 29]
    assert all(len(line) <= 80 for line in drawing)
    # the bright bar of the synthetic digit is drawn with the darkest shade
    bar_row = 3 + 2 * int(test_y[i]) + 1
    assert "@@" * 10 in drawing[bar_row]


def test_show_filters(trained, capsys):
    data_dir, model, _, tmp_path = trained
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--load-model", model, "--log-file",
                            str(tmp_path / "l2.txt"), "--show-filters", "--quiet")
    assert code == 0
    assert "conv filters" in out
    assert "filter 0" in out and "filter 7" in out
    cells = [line for line in out.splitlines() if set(line) <= set(" +-.") and line.strip()]
    assert len(cells) == 6                         # 3 rows for filters 0-5, 3 rows for filters 6-7
    assert "+++" in out or "---" in out            # the largest weight gets full marks


def test_filter_cells_signs():
    w = np.array([[1.0, -1.0, 0.0], [0.5, -0.34, 0.01], [0, 0, 0]])
    assert reports.filter_cells(w, 1.0) == ["+++ ---  . ", " ++  -   . ", " .   .   . "]


def test_history_csv(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    path = tmp_path / "history.csv"
    code, _, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "3", "--log-file",
                          str(tmp_path / "l.txt"), "--history", str(path), "--quiet")
    assert code == 0
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,loss,train_accuracy,test_accuracy,seconds"
    rows = np.loadtxt(path, delimiter=",", skiprows=1)
    assert rows.shape == (3, 5)
    np.testing.assert_array_equal(rows[:, 0], [1, 2, 3])
    assert rows[2, 1] < rows[0, 1]                 # the loss fell
    assert np.all((rows[:, 2:4] >= 0) & (rows[:, 2:4] <= 1)) and np.all(rows[:, 4] > 0)


def test_history_refused_with_load_model(capsys, tmp_path):
    model = tmp_path / "m.npz"
    model.write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        m.main(["--load-model", str(model), "--history", str(tmp_path / "h.csv")])
    assert e.value.code == 2 and "--history" in capsys.readouterr().err


def test_plot_without_matplotlib_is_refused_before_any_work(small_mnist, tmp_path, capsys, monkeypatch):
    """Exit 2 at once with one line naming how to install it: no training first (the data
    folder is not even read: an empty one would fail with exit 1), no log written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib fails
    empty = tmp_path / "empty"
    empty.mkdir()
    png = tmp_path / "plot.png"
    for data_dir in (small_mnist[0], str(empty)):
        with pytest.raises(SystemExit) as e:
            m.main(["--data-dir", data_dir, "--no-download", "--epochs", "1", "--log-file",
                    str(tmp_path / "l.txt"), "--plot", str(png)])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and out == ""
        assert len(err.splitlines()) == 1 and len(err.rstrip("\n").replace(sys.prefix, "VENV")) <= 100
        assert "--plot" in err and "matplotlib" in err
        assert f"pip install matplotlib" in err and os.path.join("bin", "pip") in err   # the venv's pip
        assert not png.exists() and not (tmp_path / "l.txt").exists()


def test_plot_refusal_needs_matplotlib_to_be_missing(small_mnist, tmp_path, capsys, monkeypatch):
    """The same command line with matplotlib 'installed' (a stand-in found by importlib) gets past
    the check: it then fails on the empty data folder instead (exit 1), not on matplotlib."""
    import importlib.machinery
    import types
    fake = types.ModuleType("matplotlib")
    fake.__spec__ = importlib.machinery.ModuleSpec("matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib", fake)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(capsys, "--data-dir", str(empty), "--no-download", "--log-file",
                            str(tmp_path / "l.txt"), "--plot", str(tmp_path / "plot.png"))
    assert code == 1 and "matplotlib" not in err and "missing" in err


def test_plot_with_matplotlib(small_mnist, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data_dir, _, _ = small_mnist
    png = tmp_path / "plot.png"
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "2", "--log-file",
                            str(tmp_path / "l.txt"), "--plot", str(png))
    assert code == 0 and f"Wrote the plot to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000


# --- reading pictures ----------------------------------------------------------------
def test_pgm_p5_p2_and_npy_read_the_same(tmp_path):
    image = (np.arange(35 * 20) % 256).astype(np.uint8).reshape(20, 35)
    write_pgm(tmp_path / "a.pgm", image, binary=True)
    write_pgm(tmp_path / "b.pgm", image, binary=False)
    np.save(tmp_path / "c.npy", image)
    for name in ("a.pgm", "b.pgm", "c.npy"):
        np.testing.assert_array_equal(own_digits.read_image(str(tmp_path / name)), image.astype(float))


def test_pgm_16_bit(tmp_path):
    values = np.array([[0, 1000], [65535, 30000]], dtype=">u2")
    (tmp_path / "d.pgm").write_bytes(b"P5 2 2 65535\n" + values.tobytes())
    np.testing.assert_allclose(own_digits.read_image(str(tmp_path / "d.pgm")),
                               values.astype(float) * 255 / 65535)


@pytest.mark.parametrize("content, message", [
    (b"P5\n10 10\n255\n" + bytes(50), "truncated"),
    (b"P6\n2 2\n255\n" + bytes(12), "not a PGM image"),
    (b"P5\n", "truncated PGM header"),
])
def test_damaged_pgm(tmp_path, content, message):
    (tmp_path / "bad.pgm").write_bytes(content)
    with pytest.raises(own_digits.ImageError, match=message):
        own_digits.read_image(str(tmp_path / "bad.pgm"))


def test_png_without_pillow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(own_digits.ImageError, match="needs Pillow"):
        own_digits.read_image(str(tmp_path / "x.png"))


@pytest.mark.parametrize("picture", ["my_seven.png", "photo.JPG", "scan.jpeg"])
def test_predict_png_without_pillow_is_refused_before_any_work(tmp_path, capsys, monkeypatch, picture):
    """Exit 2 at once, one line naming the picture and how to install Pillow.  The model file
    is not even read (it is not a model: reading it would fail with exit 1)."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.chdir(tmp_path)                       # short names: the line's length is the message's
    # (the venv's own folder, wherever this clone was made, is not counted in that length)
    with open("m.npz", "wb") as f:
        f.write(b"not a model")
    write_pgm("three.pgm", np.zeros((28, 28), np.uint8))
    with pytest.raises(SystemExit) as e:
        m.main(["--load-model", "m.npz", "--predict", "three.pgm", picture])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1 and len(err.rstrip("\n").replace(sys.prefix, "VENV")) <= 100
    assert picture in err and "three.pgm" not in err and "Pillow" in err
    assert "pip install Pillow" in err and os.path.join("bin", "pip") in err       # the venv's pip


def test_predict_of_pgm_and_npy_needs_no_pillow(tmp_path, capsys, monkeypatch):
    """Only PNG and JPEG need Pillow: with PGM and .npy the run goes on to read the model
    (here not a model: exit 1, saying so)."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    model = tmp_path / "m.npz"
    model.write_bytes(b"not a model")
    write_pgm(tmp_path / "a.pgm", np.zeros((28, 28), np.uint8))
    np.save(tmp_path / "b.npy", np.zeros((28, 28)))
    code, _, err = run_main(capsys, "--load-model", str(model), "--predict", str(tmp_path / "a.pgm"),
                            str(tmp_path / "b.npy"))
    assert code == 1 and "Pillow" not in err and "not a model file saved by mnist_net" in err


# --- MNIST-style preprocessing ----------------------------------------------------------
def ink_box(image, level=128):
    rows, cols = np.flatnonzero((image >= level).any(axis=1)), np.flatnonzero((image >= level).any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def centre_of_mass(image):
    total = image.sum()
    return (image.sum(axis=1) @ np.arange(28)) / total, (image.sum(axis=0) @ np.arange(28)) / total


def test_dark_block_on_light_paper_becomes_centred_20_pixel_block():
    """A 100x50 dark block off centre on a 300x400 light page -> a 20x10 white block,
    its centre of mass at the middle of the 28x28 field, black around it."""
    page = np.full((300, 400), 200.0)
    page[30:130, 280:330] = 40
    out = own_digits.mnist_like(page)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    top, bottom, left, right = ink_box(out)
    assert (bottom - top + 1, right - left + 1) == (20, 10)
    assert (top, left) == (4, 9)
    assert out[top + 1:bottom, left + 1:right].min() == 255           # solid inside
    lit = np.zeros((28, 28), bool)
    lit[top - 1:bottom + 2, left - 1:right + 2] = True               # a soft edge at most 1 pixel wide
    assert out[~lit].max() == 0
    cy, cx = centre_of_mass(out)
    assert abs(cy - 13.5) <= 0.5 and abs(cx - 13.5) <= 0.5


def test_position_size_and_polarity_do_not_matter():
    rng = np.random.default_rng(0)
    results = []
    for (h, w), top, left, k, light in [((300, 400), 30, 280, 1, True), ((500, 300), 300, 20, 1, True),
                                         ((700, 900), 100, 100, 3, True), ((300, 400), 150, 40, 1, False)]:
        page = np.full((h, w), 210.0 if light else 20.0) + rng.normal(0, 6, (h, w))
        ink = 30.0 if light else 230.0
        # an "L": a vertical bar and a foot, k times larger on the big page
        page[top:top + 90 * k, left:left + 12 * k] = ink
        page[top + 78 * k:top + 90 * k, left:left + 50 * k] = ink
        results.append(own_digits.mnist_like(page))
    for other in results[1:]:
        assert np.abs(other.astype(int) - results[0].astype(int)).mean() < 12
        assert ink_box(other) == ink_box(results[0])


def test_uneven_lighting_and_grain_are_not_ink():
    rng = np.random.default_rng(1)
    page = 190 + np.linspace(-30, 30, 400)[None, :] + np.linspace(0, 25, 300)[:, None] \
        + rng.normal(0, 10, (300, 400))
    page[100:200, 150:165] = 45                    # a plain stroke: a "1"
    out = own_digits.mnist_like(page)
    top, bottom, left, right = ink_box(out, level=40)
    assert bottom - top + 1 == 20 and right - left + 1 <= 5


def test_thin_pen_strokes_are_thickened():
    page = np.full((400, 400), 200.0)
    page[50:350, 200:203] = 30                     # 3 px pen, 300 px tall: 0.2 px after scaling
    out = own_digits.mnist_like(page)
    assert (out > 128).sum(axis=1).max() >= 2      # thick enough to see, like MNIST's strokes


def test_blank_picture_is_an_error():
    with pytest.raises(own_digits.ImageError, match="no digit found"):
        own_digits.mnist_like(np.full((50, 60), 180.0) + np.random.default_rng(0).normal(0, 3, (50, 60)))


def test_speck_on_the_paper_is_ignored():
    page = np.full((300, 300), 200.0)
    page[50:150, 100:115] = 40
    clean = own_digits.mnist_like(page)
    page[280:283, 280:283] = 40                    # a crumb far from the digit
    np.testing.assert_array_equal(own_digits.mnist_like(page), clean)


# --- --predict end to end ----------------------------------------------------------------
def test_predict_prints_one_line_per_image_and_survives_bad_ones(trained, capsys):
    _, model, _, tmp_path = trained
    rng = np.random.default_rng(0)
    good = tmp_path / "three.pgm"
    write_pgm(good, draw_digit(3, rng, canvas=(200, 260), height=120, pen=10))
    np.save(tmp_path / "seven.npy", draw_digit(7, rng, canvas=(180, 180), height=120, pen=10))
    blank = tmp_path / "blank.pgm"
    write_pgm(blank, np.full((50, 50), 200, np.uint8), binary=False)
    broken = tmp_path / "broken.pgm"
    broken.write_bytes(b"P5\n100 100\n255\n" + bytes(10))
    code, out, _ = run_main(capsys, "--load-model", model, "--predict", str(good), str(blank),
                            str(broken), str(tmp_path / "missing.pgm"), str(tmp_path / "seven.npy"))
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith(f"{good}: prediction ") and "(p=" in lines[0] and ", then " in lines[0]
    assert lines[1] == f"{blank}: error: no digit found (nothing stands out from the background)"
    assert lines[2] == f"{broken}: error: PGM file is truncated"
    assert lines[3].endswith("missing.pgm: error: no such file")
    assert lines[4].startswith(f"{tmp_path / 'seven.npy'}: prediction ")
    assert "Traceback" not in out


def test_predict_needs_load_model(capsys):
    with pytest.raises(SystemExit) as e:
        m.main(["--predict", "x.pgm"])
    assert e.value.code == 2 and "--predict needs --load-model" in capsys.readouterr().err


def l_shape(h, w, top, left, k, paper, ink, rng=None, grain=0.0):
    page = np.full((h, w), float(paper))
    if rng is not None:
        page += rng.normal(0, grain, (h, w))
    page[top:top + 90 * k, left:left + 12 * k] = ink
    page[top + 78 * k:top + 90 * k, left:left + 50 * k] = ink
    return page


def test_tight_crops_and_dark_paper_read_like_a_roomy_page():
    """A crop that is nearly all digit, an MNIST-sized picture, and an underexposed
    page (grey paper darker than mid-grey) all give the roomy page's result."""
    rng = np.random.default_rng(3)
    roomy = own_digits.mnist_like(l_shape(300, 400, 100, 100, 1, 210, 30, rng, 6))
    tight = own_digits.mnist_like(l_shape(100, 60, 5, 5, 1, 210, 30, rng, 6))
    small = own_digits.mnist_like(l_shape(300, 400, 100, 100, 1, 210, 30)[95:200:4, 95:160:4][:28, :28])
    dark = own_digits.mnist_like(l_shape(300, 400, 100, 100, 1, 105, 20, rng, 6))
    for other in (tight, small, dark):
        assert ink_box(other) == ink_box(roomy)
        assert np.abs(other.astype(int) - roomy.astype(int)).mean() < 15


def test_mnist_digit_as_is_and_inverted_keeps_its_shape():
    digit = np.zeros((28, 28))
    digit[4:24, 12:16] = 255                       # an MNIST-style "1": white on black, 20 tall
    for picture in (digit, 255 - digit):
        out = own_digits.mnist_like(picture)
        top, bottom, left, right = ink_box(out)
        assert (bottom - top + 1) == 20 and right - left + 1 <= 5


def test_nan_and_out_of_range_pictures_are_refused(tmp_path):
    bad = np.full((30, 30), 200.0)
    bad[3, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(own_digits.ImageError, match="NaN"):
        own_digits.read_image(str(tmp_path / "nan.npy"))
    (tmp_path / "big.pgm").write_text("P2\n2 1\n255\n10 340\n")
    with pytest.raises(own_digits.ImageError, match="outside 0-255"):
        own_digits.read_image(str(tmp_path / "big.pgm"))


def test_png_with_transparency_and_rotated_jpeg(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgba = np.zeros((120, 80, 4), np.uint8)         # transparent background ...
    rgba[10:110, 30:45] = (20, 20, 20, 255)         # ... and an opaque dark stroke
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    grey = own_digits.read_image(str(tmp_path / "alpha.png"))
    assert grey[0, 0] == 255 and grey[50, 35] == 20  # transparent reads as white paper
    photo = Image.fromarray(np.full((60, 100), 200, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6                                 # orientation: rotate 90 degrees to display
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    assert own_digits.read_image(str(tmp_path / "rotated.jpg")).shape == (100, 60)
