"""--show-maps and --why (tools/maps_and_saliency.py): every layer's output against the fast
network and plain loops, the saliency against finite differences, the terminal drawings, the
PNG, the command line for seed, deep and a learner's own network, and how much of the
saliency lies on or near the ink of a digit.  "Ink" is a pixel of 128 or more (of 255);
"near" is at most 2 rows and 2 columns away from one (ms.near_ink)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fast_layers
import mnist_net as m
from conftest import ROOT, synthetic_digits
from drawn_digits import draw_digit, write_pgm
from reference import conv_naive, maxpool_naive
from tools import maps_and_saliency as ms
from tools.command_line import parse_args
from tools.gradcheck import numeric_gradient, relative_error
from tools.model_files import chapter_copy, load_model

OWN = "conv4 relu conv6x5p1 bn relu pool dropout0.3 fc16 bn relu fc10"    # odd sizes; bn on maps, features
NETS = {"seed": m.PRESETS["seed"], "deep": m.PRESETS["deep"], "own": OWN}


def network(spec, dtype=np.float32, seed=0, kind=m.Network):
    """A network with random weights and batch norm statistics that are not the identity's."""
    rng = np.random.default_rng(seed)
    net = kind(spec, rng, dtype)
    for name, value in net.state.items():
        if name.endswith("running_mean"):
            value[...] = rng.normal(0, 0.5, value.shape)
        elif name.endswith("running_var"):
            value[...] = rng.uniform(0.3, 3, value.shape)
        elif name.startswith("bn") and name.endswith(("weight", "bias")):
            value[...] = rng.normal(1 if name.endswith("weight") else 0, 0.3, value.shape)
    return net


def naive_outputs(net, x):
    """Every layer's output for x (N, 1, 28, 28) in float64, with the plain loops of reference.py."""
    outs, h = [], x.astype(np.float64)
    for layer in net.layers:
        if layer.kind == "conv":
            h = conv_naive(h, layer.params["weight"], layer.params["bias"], layer.pad)
        elif layer.kind == "pool":
            h = maxpool_naive(h)
        elif layer.kind == "relu":
            h = np.maximum(h, 0)
        elif layer.kind == "bn":
            shape = (1, -1) + (1,) * (h.ndim - 2)
            b = {k: v.reshape(shape) for k, v in layer.buffers.items() if k != "num_batches_tracked"}
            gamma, beta = layer.params["weight"].reshape(shape), layer.params["bias"].reshape(shape)
            h = gamma * (h - b["running_mean"]) / np.sqrt(b["running_var"] + 1e-5) + beta
        elif layer.kind == "flatten":
            h = h.reshape(len(h), -1)
        elif layer.kind == "fc":
            h = h @ layer.params["weight"].T + layer.params["bias"]
        outs.append(h[0])                                  # dropout: nothing, in evaluation
    return outs


# --- what is computed ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NETS)
def test_layer_outputs_are_every_layers_output_in_list_order(name):
    """Built from the fast path's network (as after a default run), the twin is the chapter's, and
    its layers' outputs are the loops' in float32; the last is what the fast network computes."""
    net = network(NETS[name], kind=fast_layers.FastNetwork)
    twin = chapter_copy(net)
    assert type(twin) is m.Network and (twin.mean, twin.std) == (net.mean, net.std)
    x = np.random.default_rng(1).normal(size=(1, 1, 28, 28)).astype(np.float32)
    outputs = ms.layer_outputs(twin, x)
    assert [token for token, _, _ in outputs] == net.tokens
    assert [out.shape for _, _, out in outputs] == [tuple(s) for s in net.shapes]
    for (token, _, out), expected in zip(outputs, naive_outputs(net, x)):
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=token)
    np.testing.assert_allclose(outputs[-1][2], net.forward(x, train=False)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NETS)
def test_saliency_is_the_gradient_of_the_score_in_evaluation_mode(name):
    """Against centered differences of the evaluation-mode logit, in float64, on an input
    without ties (a max-pool has no derivative where two values of a window are equal)."""
    net = network(NETS[name], np.float64)
    twin = chapter_copy(net)
    x = np.random.default_rng(2).normal(size=(1, 1, 28, 28))
    for k in (3, 8):
        grad = ms.saliency(twin, x, np.array([k]))[0]
        pixels = np.random.default_rng(k).choice(784, 60, replace=False)
        numeric = numeric_gradient(lambda: twin.forward(x, train=False)[0, k], x, 1e-6, pixels)[0, 0]
        assert relative_error(grad.reshape(-1)[pixels], numeric.reshape(-1)[pixels]) < 1e-6


def test_batch_norm_backward_after_an_evaluation_forward_is_the_evaluation_derivative():
    """After forward(train=False) batch norm is a fixed scale per channel, and its backward
    says so; the training backward (the batch's mean and variance moving with x) would be
    far off the deep network's input gradient."""
    net = network(NETS["deep"], np.float64)
    twin = chapter_copy(net)
    x = np.random.default_rng(2).normal(size=(1, 1, 28, 28))
    evaluation = ms.saliency(twin, x, np.array([3]))[0]
    twin.forward(x, train=True)
    training = twin.backward(np.eye(10)[[3]], input_grad=True)[0, 0]
    assert relative_error(evaluation, training) > 0.05
    bn = twin.layers[1]
    bn.forward(x.repeat(16, axis=1), train=False)
    dout = np.random.default_rng(4).normal(size=(1, 16, 28, 28))
    scale = bn.params["weight"] / np.sqrt(bn.buffers["running_var"] + bn.eps)
    np.testing.assert_allclose(bn.backward(dout), dout * scale[None, :, None, None], rtol=1e-12)


def test_without_batch_norm_saliency_is_the_networks_own_backward():
    net = network(NETS["seed"])
    twin = chapter_copy(net)
    x = np.random.default_rng(3).normal(size=(2, 1, 28, 28)).astype(np.float32)
    got = ms.saliency(twin, x, np.array([4, 9]))
    twin.forward(x, train=False)
    own_backward = twin.backward(np.eye(10, dtype=np.float32)[[4, 9]], input_grad=True)
    np.testing.assert_array_equal(got, own_backward[:, 0])


@pytest.mark.parametrize("kind", [m.Network, fast_layers.FastNetwork])
def test_the_twin_leaves_the_network_alone(kind):
    net = network(NETS["deep"], kind=kind)
    net.mean, net.std = 0.2860, 0.3530                      # a Fashion-MNIST network's scaling
    before = {k: v.copy() for k, v in net.state.items()}
    grad_before = net.grad.copy()
    twin = chapter_copy(net)
    ms.saliency(twin, np.ones((1, 1, 28, 28), np.float32), np.array([0]))
    assert type(twin) is m.Network and (twin.mean, twin.std) == (0.2860, 0.3530)
    assert np.any(twin.grad != 0) and np.array_equal(net.grad, grad_before)
    for k, v in net.state.items():
        np.testing.assert_array_equal(v, before[k])
        np.testing.assert_array_equal(twin.state[k], v)
        assert twin.state[k] is not v


def test_near_ink_and_the_share_of_the_gradient():
    image = np.zeros((28, 28), np.uint8)
    image[10, 10] = 128                                    # ink: 128 or more
    image[20, 20] = 127                                    # not ink
    near = ms.near_ink(image)
    assert near.sum() == 25 and near[8:13, 8:13].all()     # the 5x5 square around the ink
    grad = np.zeros((28, 28))
    grad[12, 12], grad[13, 13], grad[20, 20] = -3.0, 1.0, 2.0   # on the square's corner, just off, far
    assert ms.share_near_ink(grad, image) == pytest.approx(0.5)


# --- the terminal ----------------------------------------------------------------------------------
def test_each_map_is_drawn_on_its_own_scale_and_square():
    small = np.arange(49, dtype=float).reshape(7, 7)
    lines = ms.map_lines(small)
    assert len(lines) == 7 and all(len(line) == 14 for line in lines)          # 2 characters a pixel
    assert lines[0].startswith("  ") and lines[-1].endswith("@@")
    assert ms.map_lines(small * 1000 - 5) == lines                 # its own range, not a shared one
    wide = np.zeros((26, 26))
    wide[:, 13:] = 1
    lines = ms.map_lines(wide)
    assert len(lines) == 13 and all(line == " " * 13 + "@" * 13 for line in lines)   # a line per two rows
    assert ms.map_lines(np.full((13, 13), 2.0)) == [" " * 13] * 7             # a constant map: blank


def test_grid_fits_100_columns():
    cells = [(f"{c} -0.12..3.4", ms.map_lines(np.random.default_rng(c).random((28, 28)))) for c in range(32)]
    lines = ms.grid(cells)
    assert max(len(line) for line in lines) <= 100
    assert len(lines) == 11 * 15                   # 3 maps of 28 columns a row: 11 rows, a header + 14 lines


def test_dense_layers_list_their_strongest_units():
    values = np.array([0.5, -2.0, 3.0, 0.0, 1.0, 2.5, -1.0, 0.2, 0.1, 0.3, 0.4], np.float32)
    lines = ms.dense_lines(values, False, m.DATASETS["mnist"].classes)
    assert len(lines) == ms.TOP_UNITS
    assert [int(line.split()[1]) for line in lines] == [2, 5, 4, 0, 10, 9, 7, 8]
    assert lines[0].endswith("#" * 40) and "#" * 33 in lines[1] and "#" * 34 not in lines[1]
    scores = ms.dense_lines(np.arange(10.0) - 2, True, m.DATASETS["mnist"].classes)
    assert scores[0].split()[:3] == ["9", "7.00", "p=0.63"] and scores[-1].split()[:2] == ["0", "-2.00"]


# --- the command line -------------------------------------------------------------------------------
def run_main(capsys, *argv):
    code = m.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", NETS)
def test_show_maps_and_why_for_every_kind_of_network(name, small_mnist, tmp_path, capsys):
    data_dir, _, (test_x, test_y) = small_mnist
    log, model = tmp_path / "log.txt", tmp_path / "m.npz"
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--net", NETS[name], "--quiet",
                              "--log-file", str(log), "--save-model", str(model), "--show-maps", "7",
                              "--why", "7")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    predicted = int(np.loadtxt(log, dtype=int)[7, 0])
    assert f"maps of test image 7 (labelled {test_y[7]}): predicted {predicted} (p=" in out
    # the input, then every layer of the list with its shape, in order
    start = lines.index("input (1, 28, 28)")
    assert "@@" * 10 in lines[start + 1 + 3 + 2 * int(test_y[7])]          # the synthetic digit's bright bar
    net = m.Network(NETS[name], np.random.default_rng(0))
    labels = [i for i, line in enumerate(lines) if " -> (" in line]
    assert [lines[i].split(" -> ")[1].split(")")[0] + ")" for i in labels] == [str(s) for s in net.shapes]
    assert [lines[i].split()[0] for i in labels] == net.tokens
    # a row of maps per layer, the same maps from a conv down to the next, the most active where
    # that stretch ends (recomputed here from the saved network), and where to see them all
    saved = load_model(str(model))
    outputs = ms.layer_outputs(chapter_copy(saved), m.to_input(test_x[7:8], saved.mean, saved.std))
    drawn, cut = [], False
    for k, (i, shape) in enumerate(zip(labels, net.shapes)):
        if len(shape) != 3:
            continue
        block = lines[i + 1:labels[k + 1] - 1]
        assert f": {shape[0]} maps" in lines[i]
        assert not block[-1].strip() == "" and len(block) == 1 + len(ms.map_lines(np.zeros(shape[1:])))
        channels = [int(word) for word in block[0].split()[::2]]       # the headers: "c low..high"
        assert channels == sorted(channels) and len(set(channels)) == len(channels)
        assert all(f"{c} " in block[0] for c in channels)
        cut |= len(channels) < shape[0]
        if len(channels) < shape[0]:
            assert lines[i].split(" maps")[1].startswith(f", {len(channels)} drawn")
        drawn.append((k, net.layers[k].kind, channels))
    for n, (k, kind, channels) in enumerate(drawn):
        stretch_ends = n + 1 == len(drawn) or drawn[n + 1][1] == "conv" or drawn[n + 1][0] != k + 1
        if n and kind != "conv" and drawn[n - 1][0] == k - 1:
            assert channels == drawn[n - 1][2]                   # the same maps as the layer above
        if stretch_ends:
            activity = np.abs(outputs[k][2]).mean(axis=(1, 2))
            assert np.min(activity[channels]) >= np.max(np.delete(activity, channels), initial=0)
    assert cut == ("--plot maps.png draws every map" in lines)
    assert cut                                                  # 8, 16 and 4 maps do not fit one row
    top = lines[labels[-1] + 1].split()
    assert top[0] == str(predicted) and top[2].startswith("p=")             # the scores, highest first
    assert len(lines) - labels[-1] - 1 >= 10
    why = next(i for i, line in enumerate(lines) if line.startswith("why test image 7"))
    assert f"predicted {predicted} (p=" in lines[why] and ", runner-up " in lines[why]
    panels = lines[why + 3]
    assert panels.startswith("  input") and panels.count("% near ink") == 2
    assert len([line for line in lines[why + 4:] if line.strip()]) >= 10     # the digit and two saliency maps


def test_show_maps_of_the_deep_network_is_not_a_wall_of_text(small_mnist, tmp_path, capsys):
    """573 lines before (every map of every layer); now a row per layer, and the PNG named."""
    data_dir, _, _ = small_mnist
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--limit", "64", "--net",
                              "deep", "--quiet", "--log-file", str(tmp_path / "log.txt"), "--show-maps", "0")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) < 200 and max(len(line) for line in lines) <= 100
    assert "--plot maps.png draws every map" in lines
    assert lines.count("") == 14                                 # input, 12 layers, and the end


def test_show_maps_names_the_plot_given():
    net = network(NETS["seed"])
    twin = chapter_copy(net)
    image = synthetic_digits(1, 0)[0][0]
    outputs = ms.layer_outputs(twin, m.to_input(image[None]))
    lines = ms.show_maps_lines(twin, outputs, image, "x", m.DATASETS["mnist"].classes, "inside.png")
    assert "--plot inside.png draws every map" in lines
    everything = ms.show_maps_lines(twin, outputs, image, "x", m.DATASETS["mnist"].classes)
    assert "--plot maps.png draws every map" in everything


def test_maps_shown_fit_one_row_and_follow_a_conv_to_the_next():
    net = network("conv4 relu pool conv8p1 bn relu pool fc10")
    twin = chapter_copy(net)
    outputs = ms.layer_outputs(twin, np.random.default_rng(5).normal(size=(1, 1, 28, 28)).astype(np.float32))
    shown = ms.maps_shown(outputs)
    assert sorted(shown) == [0, 1, 2, 3, 4, 5, 6]
    assert shown[0] == shown[1] == shown[2] and len(shown[0]) == 3      # 26 wide: 3 maps fit 100 columns
    assert shown[3] == shown[4] == shown[5] == shown[6] and len(shown[3]) == 6   # 13 wide: 6 maps fit
    activity = np.abs(outputs[6][2]).mean(axis=(1, 2))                  # the pool at the stretch's end
    assert sorted(np.argsort(-activity)[:6].tolist()) == shown[3]
    assert ms.maps_shown(outputs, width=1000)[3] == list(range(8))      # all, when they fit


def test_index_out_of_range_is_one_line_before_any_training(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist                                            # 100 test images
    log = tmp_path / "log.txt"
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--log-file", str(log), "--why", "100")
    assert code == 2 and not log.exists() and "epoch" not in out
    assert err == "error: --why 100: the test set has 100 images, 0 to 99\n"
    with pytest.raises(SystemExit) as e:
        m.main(["--show-maps", "-1"])
    assert e.value.code == 2 and "--show-maps: -1 must be 0 or more" in capsys.readouterr().err


@pytest.fixture
def model(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    path = tmp_path / "m.npz"
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--log-file",
                            str(tmp_path / "l.txt"), "--save-model", str(path), "--quiet")
    assert code == 0, err
    return str(path)


def test_with_predict_the_index_picks_the_picture(model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    good, broken = tmp_path / "three.pgm", tmp_path / "broken.pgm"
    write_pgm(good, draw_digit(3, rng, canvas=(200, 260), height=120, pen=10))
    broken.write_bytes(b"P5\n100 100\n255\n" + bytes(10))
    code, out, err = run_main(capsys, "--load-model", model, "--predict", str(broken), str(good),
                              "--show-maps", "1", "--why", "1")
    assert code == 1, err                                  # the broken picture is still an error
    lines = out.splitlines()
    assert lines[0] == f"{broken}: error: PGM file is truncated"
    predicted = lines[1].split("prediction ")[1][0]
    assert lines[2].startswith(f"maps of three.pgm: predicted {predicted} (p=")
    assert any(line.startswith(f"why three.pgm? predicted {predicted} (p=") for line in lines)
    code, out, _ = run_main(capsys, "--load-model", model, "--predict", str(broken), str(good), "--why", "0")
    assert code == 1 and out.splitlines()[-1] == f"--why 0: {broken} cannot be shown: PGM file is truncated"
    with pytest.raises(SystemExit) as e:
        m.main(["--load-model", model, "--predict", str(good), "--why", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mnist_net.py: error: --why 1: with --predict, I counts its pictures from 0, and there is 1")


def test_a_folder_is_not_a_picture(tmp_path):
    from tools import own_digits
    with pytest.raises(own_digits.ImageError, match="^is a folder, not a picture$"):
        own_digits.read_image(str(tmp_path))


def test_plot_holds_the_maps_and_the_saliency(model, small_mnist, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data_dir, _, _ = small_mnist
    png = tmp_path / "inside.png"
    code, out, _ = run_main(capsys, "--data-dir", data_dir, "--load-model", model, "--log-file",
                            str(tmp_path / "l2.txt"), "--show-maps", "0", "--why", "0", "--plot", str(png))
    assert code == 0
    assert f"Wrote the saliency and maps to {png}" in out and "Wrote the plot to" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    picture = imread(png)
    assert picture.shape[0] > 1000 and picture.shape[1] == 1400            # 14 inches at 100 dpi, tall
    assert (picture[..., :3].std(axis=2) > 0.2).mean() > 0.005               # red and blue, not only grey


def test_plot_without_matplotlib_is_one_line(model, small_mnist, tmp_path, capsys, monkeypatch):
    """Refused before any work by the command line (exit 2); plot() itself, called without it,
    says so in one line and draws nothing."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)                   # import matplotlib fails
    data_dir, _, _ = small_mnist
    png = tmp_path / "inside.png"
    with pytest.raises(SystemExit) as e:
        m.main(["--data-dir", data_dir, "--load-model", model, "--why", "0", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and not png.exists()
    assert len(err.splitlines()) == 1 and "--plot needs matplotlib" in err and "install matplotlib" in err
    said = []
    assert ms.plot(str(png), None, None, None, said.append) is False
    assert said == [f"--plot {png}: skipped, matplotlib is not installed (pip install matplotlib)"]
    assert not png.exists()


# --- how much of the saliency lies near the ink -----------------------------------------------------------
def shares(net, images):
    twin = chapter_copy(net)
    x = m.to_input(images, net.mean, net.std)
    grads = ms.saliency(twin, x, twin.forward(x, train=False).argmax(axis=1))
    return np.array([ms.share_near_ink(g, image) for g, image in zip(grads, images)])


def test_saliency_moves_onto_the_ink_as_the_network_learns():
    """The synthetic digits of conftest.py (a bright bar whose row is the class, on noise of 0-59):
    an untrained deep network's saliency spreads like the image (about the 21% of pixels near
    the bar); trained 3 epochs, at least twice that share lies on or near the bar, for each of 10
    test digits.  The issue's 80% is not reached here: the net also reads where no bar is."""
    train_x, train_y = synthetic_digits(300, 0)
    test_x, test_y = synthetic_digits(10, 1)
    area = np.array([ms.near_ink(image).mean() for image in test_x])
    args = parse_args(["--net", "deep", "--epochs", "3", "--quiet"])
    untrained = shares(m.Network(args.net, np.random.default_rng(args.seed)), test_x)
    net, _, (accuracy, _, _) = m.train(args, (train_x, train_y, test_x, test_y), out=lambda line: None)
    trained = shares(net, test_x)
    assert accuracy == 1.0
    assert np.all(untrained < 1.6 * area)
    assert np.all(trained > 2 * area) and trained.mean() > untrained.mean() + 0.25


REAL = pytest.mark.skipif(not os.environ.get("MNIST_NET_REAL_DATA"),
                          reason="set MNIST_NET_REAL_DATA=1 to fetch real MNIST")


@pytest.fixture(scope="module")
def real_seed_model(tmp_path_factory):
    """The seed network trained 1 epoch on the first 10,000 real MNIST digits (about 91%), on
    the files in mnist_data/ if they are there, else on a fresh download."""
    folder = tmp_path_factory.mktemp("real_saliency")
    model, script = folder / "m.npz", os.path.join(ROOT, "mnist_net.py")
    present = all(m.find_idx_file(m.DATA_DIR, name) for name in m.IDX_NAMES.values())
    data = m.DATA_DIR if present else str(folder / "data")
    for argv in (["--data-dir", data, "--download-only"],
                 ["--data-dir", data, "--no-download", "--epochs", "1", "--limit", "10000",
                  "--log-file", str(folder / "log.txt"), "--save-model", str(model), "--quiet"]):
        got = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=600)
        assert got.returncode == 0, got.stdout + got.stderr
    test_x, _ = m.load_split(data, "test")
    return load_model(str(model)), test_x[:10]


@REAL
def test_real_digits_saliency_lies_on_the_ink(real_seed_model):
    """Measured here: 0.68 0.92 0.57 0.90 0.74 0.62 0.79 0.80 0.86 0.88 of the gradient mass near
    the ink of test digits 0-9, where the near-ink area is 21-46% of the picture; untrained, 0.44."""
    net, digits = real_seed_model
    area = np.array([ms.near_ink(image).mean() for image in digits])
    trained = shares(net, digits)
    untrained = shares(m.Network(net.spec, np.random.default_rng(0)), digits)
    assert np.all(trained > area + 0.2) and trained.mean() > 0.7
    assert trained.mean() > untrained.mean() + 0.2


@REAL
@pytest.mark.xfail(strict=True, reason="the issue's bar is not met by the plain gradient: 4 of 10 digits "
                                       "here; 7 of 10 after the default 5 epochs (see docs/looking_inside.md)")
def test_real_digits_the_issues_bar(real_seed_model):
    """The issue's bar: at least 80% of the absolute gradient mass on or within 2 pixels of the
    ink, for at least 9 of 10 test digits."""
    net, digits = real_seed_model
    assert (shares(net, digits) >= 0.8).sum() >= 9
