"""--trace: every number the trace prints is recomputed here from the numbers it prints beside it
(patch, filter and bias; the pool window; logits; the terms of a weight gradient), from the
test image itself, or from the saved model, and must agree up to the rounding of the print."""
import math
import re

import numpy as np
import pytest

import fast_layers
import mnist_net as m
from conftest import synthetic_digits
from tools import trace as tr
from tools.command_line import parse_args
from tools.model_files import load_model

FX = 5e-5                        # half a unit in the 4th decimal: the rounding of a printed forward value


def run_main(capsys, *argv):
    code = m.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def numbers(line):
    return [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?|-?\d+e[-+]\d+", line)]


def line_with(lines, start):
    """The first line that starts with `start` (after its indent)."""
    for line in lines:
        if line.strip().startswith(start):
            return line
    raise AssertionError(f"no line starting with {start!r}")


def matrix_after(lines, start):
    """The rows of numbers printed right under the first line that starts with `start`."""
    k = next(k for k, line in enumerate(lines) if line.strip().startswith(start))
    rows = []
    for line in lines[k + 1:]:
        try:
            rows.append([float(v) for v in line.split()])
        except ValueError:
            break
    return np.array(rows)


def value_after(line, marker):
    return float(line.split(marker, 1)[1].split()[0].rstrip(",;:)"))


def section(lines, title):
    """The lines of one section: from the line starting with `title` to the next blank line."""
    k = next(k for k, line in enumerate(lines) if line.startswith(title))
    end = next((e for e in range(k + 1, len(lines)) if not lines[e].strip()), len(lines))
    return lines[k:end]


@pytest.fixture
def trained(small_mnist, tmp_path, capsys):
    """A seed-like network trained 2 epochs on the synthetic digits, saved; its data folder."""
    data_dir, _, test = small_mnist
    model = tmp_path / "m.npz"
    code, _, _ = run_main(capsys, "--data-dir", data_dir, "--epochs", "2", "--net", "conv4 relu pool fc32 relu fc10",
                          "--log-file", str(tmp_path / "log.txt"), "--save-model", str(model), "--quiet")
    assert code == 0
    return data_dir, str(model), test


def traced(capsys, data_dir, model, index, tmp_path):
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--load-model", model, "--trace", str(index),
                              "--quiet", "--log-file", str(tmp_path / "log2.txt"))
    assert code == 0, err
    lines = out.splitlines()
    return lines[next(k for k, line in enumerate(lines) if line.startswith("Trace of")):]


def check_conv(lines):
    """The conv section: products = patch * filter; their sum plus the bias = the output printed."""
    conv = section(lines, "Convolution")
    patch, w = matrix_after(conv, "patch ("), matrix_after(conv, "filter ")
    products = matrix_after(conv, "products")
    assert patch.shape == w.shape == products.shape == (3, 3)
    assert np.allclose(products, patch * w, atol=FX + FX * (np.abs(patch) + np.abs(w)))
    s, b, total = numbers(line_with(conv, "sum of products"))
    bound = (FX * (np.abs(patch) + np.abs(w))).sum() + 3 * FX
    assert abs(s - (patch * w).sum()) <= bound
    assert abs(total - (s + b)) <= 3 * FX
    program = numbers(line_with(conv, "the program's"))[-1]
    assert abs(program - ((patch * w).sum() + b)) <= bound
    f, i, j = (int(v) for v in re.search(r"filter (\d+): output at row (\d+), column (\d+)", conv[0]).groups())
    return f, i, j, patch, w, b, program


def check_pool(lines):
    """The pool section: the winner is the max (the first of ties), it alone gets the gradient."""
    pool = section(lines, "Max-pool")
    window = matrix_after(pool, "the four values")
    winner_name = re.search(r"the max is ([a-z-]+):", line_with(pool, "the max is")).group(1)
    winner = tr.CORNERS.index(winner_name)
    assert winner == int(np.argmax(window))              # argmax: the first in reading order
    assert numbers(line_with(pool, "the max is"))[-1] == window.flat[winner] == window.max()
    assert numbers(line_with(pool, "the program's pool output"))[-1] == window.max()
    g = value_after(line_with(pool, "backward:"), "at that output, ")
    da = matrix_after(pool, "the other three get 0").ravel()
    assert da[winner] == g and g != 0
    assert np.all(np.delete(da, winner) == 0)
    return window, winner


def check_softmax(lines, label):
    """Softmax of the printed logits, the loss and p - onehot(y)."""
    out = section(lines, "Output:")
    k = next(k for k, line in enumerate(out) if line.split()[:2] == ["class", "logit"])
    table = np.array([numbers(line)[-4:] for line in out[k + 1:k + 11]])
    z, shifted, p, dz = table.T
    assert np.allclose(shifted, z - z.max(), atol=3 * FX)
    e = np.exp(z - z.max())
    assert abs(value_after(line_with(out, "p = exp"), "the sum is ") - e.sum()) <= 1e-3 * e.sum()
    p_ref = e / e.sum()
    assert np.allclose(p, p_ref, atol=FX + 1e-3 * p_ref)
    onehot = np.eye(10)[label]
    assert np.allclose(dz, p_ref - onehot, rtol=2e-3, atol=1e-7)
    loss = value_after(line_with(out, "loss = -ln p"), "] = ")
    assert abs(loss - (np.log(e.sum()) - (z[label] - z.max()))) <= 4 * FX + 1e-3 * loss
    return z


def parse_terms(block):
    """[(row, column, g, pixel)] from the lines '(a,b): g * x;  ...'."""
    return [(int(a), int(b), float(g), float(x))
            for a, b, g, x in re.findall(r"\((\d+),(\d+)\): (\S+) \* (\S+?)(?:;|$)", "\n".join(block), re.M)]


def check_weight_gradient(lines, image, patch_shown):
    """Every term g * pixel of the printed weight, their sum, db = sum of g, the shown patch's term,
    and the whole 3x3 dW recomputed from the printed g values and the test image."""
    wg = section(lines, "Weight gradient")
    count = int(re.search(r"g is nonzero at (\d+) of", line_with(wg, "g is nonzero")).group(1))
    ki, kj = (int(v) for v in re.search(r"weight \[(\d+), (\d+)\]", line_with(wg, "weight [")).group(1, 2))
    k = next(k for k, line in enumerate(wg) if line.strip().startswith(f"dW[{ki}, {kj}] = sum"))
    block = [line for line in wg[k + 1:] if line.strip().startswith("(")]
    terms = parse_terms(block)
    dw = matrix_after(wg, "the program's dW")
    db = value_after(line_with(wg, "and db"), "sum of g = ")
    g_shown = value_after(line_with(wg, "the patch shown above"), "has g = ")
    term_grid = matrix_after(wg, "the patch shown above")
    # g has 4 significant digits, the patch 4 decimals, the terms 4 significant digits
    assert np.all(np.abs(term_grid - g_shown * patch_shown)
                  <= abs(g_shown) * (FX + 1e-3 * np.abs(patch_shown)) + 1e-3 * np.abs(term_grid))
    scale = sum(abs(g * x) for _, _, g, x in terms)
    if len(terms) == count:                              # listed in full
        assert abs(sum(g * x for _, _, g, x in terms) - dw[ki, kj]) <= 1e-3 * scale + 1e-9
        assert abs(sum(g for _, _, g, _ in terms) - db) <= 1e-3 * sum(abs(g) for _, _, g, _ in terms) + 1e-9
        # the other 8 weights: the same g values, each with its own pixel of the image
        for a in range(3):
            for b in range(3):
                s = sum(g * image[r + a, c + b] for r, c, g, _ in terms)
                assert abs(s - dw[a, b]) <= 2e-3 * sum(abs(g * image[r + a, c + b]) for r, c, g, _ in terms) + 1e-9
        for r, c, _, x in terms:
            assert abs(x - image[r + ki, c + kj]) <= FX
    else:                                                # the largest terms, then the others' sum
        rest = value_after(line_with(wg, "... and the other"), "add up to ")
        assert len(terms) == tr.TOP_TERMS
        assert int(re.search(r"the other (\d+) terms", line_with(wg, "... and the other")).group(1)) == count - len(terms)
        total = sum(g * x for _, _, g, x in terms) + rest
        assert abs(total - dw[ki, kj]) <= 1e-3 * (scale + abs(rest)) + 1e-9
    assert abs(dw[ki, kj]) == np.abs(dw).max()
    return terms, count


def test_trace_numbers_recompute_from_the_printed_inputs(trained, capsys, tmp_path, monkeypatch):
    data_dir, model, (test_x, test_y) = trained
    monkeypatch.setattr(tr, "ALL_TERMS", 10 ** 6)          # every term listed: the whole sum is checkable
    lines = traced(capsys, data_dir, model, 5, tmp_path)
    assert lines[0].startswith(f"Trace of test image 5 (label {test_y[5]})")
    image = m.to_input(test_x[5:6])[0, 0]
    f, i, j, patch, w, b, program = check_conv(lines)
    assert np.allclose(patch, image[i:i + 3, j:j + 3], atol=FX)   # the patch is the image's
    window, winner = check_pool(lines)
    pool = section(lines, "Max-pool")
    assert f"map {f}, window at rows {i - i % 2}-{i - i % 2 + 1}, columns {j - j % 2}-" in pool[0]
    assert window[i % 2, j % 2] == max(program, 0.0)                   # the conv output, after the ReLU
    z = check_softmax(lines, int(test_y[5]))
    terms, count = check_weight_gradient(lines, image, patch)
    assert len(terms) == count > 0

    # the numbers are the program's: the saved model's own forward pass gives the same logits
    net = load_model(model)
    logits = net.forward(m.to_input(test_x[5:6]), train=False)[0]
    assert np.allclose(z, logits, atol=FX)


def test_trace_lists_the_largest_terms_when_there_are_many(trained, capsys, tmp_path, monkeypatch):
    data_dir, model, (test_x, _) = trained
    monkeypatch.setattr(tr, "ALL_TERMS", 3)
    lines = traced(capsys, data_dir, model, 0, tmp_path)
    _, _, _, patch, *_ = check_conv(lines)
    terms, count = check_weight_gradient(lines, m.to_input(test_x[:1])[0, 0], patch)
    assert count > len(terms) == tr.TOP_TERMS


def test_trace_shapes_forward_and_backward(trained, capsys, tmp_path):
    data_dir, model, _ = trained
    lines = traced(capsys, data_dir, model, 0, tmp_path)
    forward = section(lines, "Forward:")[1:]
    assert [line.split("(", 1)[0].split()[0] for line in forward] == ["input", "conv4", "relu", "pool",
                                                                       "flatten", "fc32", "relu", "fc10"]
    shapes = [tuple(int(v) for v in re.search(r"\(([\d, ]+)\)\s*$", line).group(1).split(",")) for line in forward]
    assert shapes == [(1, 1, 28, 28), (1, 4, 26, 26), (1, 4, 26, 26), (1, 4, 13, 13), (1, 676), (1, 32),
                      (1, 32), (1, 10)]
    backward = section(lines, "Backward:")[1:]
    assert [line.split()[0] for line in backward] == ["fc10", "relu", "fc32", "flatten", "pool", "relu", "conv4"]
    assert backward[-1].endswith("(1, 1, 28, 28)") and backward[0].endswith("(1, 32)")


def test_trace_with_batch_norm_shows_the_batch_statistics(small_mnist, tmp_path, capsys):
    """Batch norm right after a padded conv: its batch mean and variance are those of the conv map,
    recomputed here from the image and the printed filter and bias; xhat and out from the printed
    numbers."""
    data_dir, _, (test_x, test_y) = small_mnist
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--net", "conv4p1 bn relu pool fc10",
                              "--trace", "--quiet", "--log-file", str(tmp_path / "log.txt"))
    assert code == 0, err
    lines = out.splitlines()
    lines = lines[next(k for k, line in enumerate(lines) if line.startswith("Trace of")):]
    assert lines[0].startswith("Trace of test image 0 ")          # --trace alone: image 0
    assert "own mean and variance" in " ".join(lines)
    conv = section(lines, "Convolution")
    f = int(re.search(r"filter (\d+):", conv[0]).group(1))
    w = matrix_after(conv, "filter ")
    b = numbers(line_with(conv, "sum of products"))[1]
    check_conv(lines)
    check_pool(lines)
    check_softmax(lines, int(test_y[0]))

    bn = section(lines, "Batch norm")
    assert f"channel {f}," in bn[0] and "784 values" in bn[0]
    mu, var = value_after(bn[1], "mu = "), value_after(bn[1], "var = ")
    image = np.pad(m.to_input(test_x[:1])[0, 0].astype(np.float64), 1)
    conv_map = np.array([[np.sum(image[r:r + 3, c:c + 3] * w) + b for c in range(28)] for r in range(28)])
    err_bound = (FX * (np.abs(w).sum() * np.abs(image).max() + 9 * 3)) + FX
    assert abs(mu - conv_map.mean()) <= err_bound
    assert abs(var - conv_map.var()) <= 2 * err_bound * np.abs(conv_map).max() + FX
    inv = numbers(line_with(bn, "1 / sqrt(var + eps)"))[-1]
    assert abs(inv - 1 / math.sqrt(var + 1e-5)) <= 1e-3 * inv
    x_line = line_with(bn, "the value x")
    x, xc = value_after(x_line, "] = "), value_after(x_line, "x - mu = ")
    assert abs(xc - (x - mu)) <= 3 * FX
    xhat = value_after(line_with(bn, "xhat ="), "sqrt(var + eps) = ")
    assert abs(xhat - xc * inv) <= FX + FX * (abs(xc) + abs(inv))
    gamma, xhat2, beta, result = numbers(line_with(bn, "out = gamma"))[-4:]
    assert xhat2 == xhat
    assert abs(result - (gamma * xhat + beta)) <= FX * (2 + abs(gamma) + abs(xhat))
    assert numbers(line_with(bn, "the program's bn1 output"))[-1] == result
    # the printed x is the conv output shown above, and in the conv map recomputed here
    assert x == numbers(line_with(conv, "the program's"))[-1]
    # the conv bias before batch norm has a gradient of 0 but for rounding, and the trace says why
    assert any("cancels any bias" in line for line in lines)


@pytest.mark.parametrize("network", [m.Network, fast_layers.FastNetwork])
def test_trace_leaves_the_network_as_it_was(small_mnist, network):
    _, _, (test_x, test_y) = small_mnist
    net = network("conv4p1 relu pool dropout0.3 fc16 bn relu fc10", np.random.default_rng(3))
    before = {name: np.array(value) for name, value in net.state.items()}
    lines = tr.trace_lines(net, m.to_input(test_x[:1]), int(test_y[0]), 0)
    assert all(np.array_equal(before[name], value) for name, value in net.state.items())
    assert any("batch of one" in line for line in lines)             # bn on features, one value each
    assert any("dropout drops values" in line for line in lines)


def test_trace_index_out_of_range_and_with_predict_are_refused(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    code, out, err = run_main(capsys, "--data-dir", data_dir, "--trace", "100", "--log-file", str(tmp_path / "l.txt"))
    assert code == 2 and "--trace 100: the test set has 100 images, 0 to 99" in err
    assert "epoch" not in out                                           # refused before training
    with pytest.raises(SystemExit) as e:
        parse_args(["--load-model", __file__, "--predict", "x.pgm", "--trace"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--trace", "-1"])


# --- issue 14: lines of at most 100 columns, a position on the stroke, what -0.4242 is ----------
def conv_position(lines):
    """(filter, row, column) of the conv output the trace shows."""
    conv = section(lines, "Convolution")
    return tuple(int(v) for v in re.search(r"filter (\d+): output at row (\d+), column (\d+)", conv[0]).groups())


@pytest.mark.parametrize("net, pad", [("seed", 0), ("deep", 1)])
def test_trace_fits_100_columns_and_follows_the_stroke(small_mnist, tmp_path, capsys, net, pad):
    """Through the command line, on the seed and deep networks trained on the synthetic digits
    (a bar of 250 on noise of 0-59: the bar is the ink): every line fits 100 columns, and the
    conv output shown has an ink pixel under its filter's centre, on several test images."""
    data_dir, _, (test_x, test_y) = small_mnist
    model = tmp_path / "m.npz"
    code, _, err = run_main(capsys, "--data-dir", data_dir, "--epochs", "1", "--limit", "100", "--net", net,
                            "--quiet", "--log-file", str(tmp_path / "log.txt"), "--save-model", str(model))
    assert code == 0, err
    for index in (0, 3, 8):
        code, out, err = run_main(capsys, "--data-dir", data_dir, "--load-model", str(model),
                                  "--trace", str(index), "--quiet")    # quiet: no line naming tmp_path
        assert code == 0, err
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 100, max(lines, key=len)
        trace = lines[next(k for k, line in enumerate(lines) if line.startswith("Trace of")):]
        f, i, j = conv_position(trace)
        image = test_x[index]
        assert image[i - pad + 1, j - pad + 1] >= 128                 # the centre of the 3x3 patch is ink
        assert "on the stroke" in section(trace, "Convolution")[1]
        patch = matrix_after(section(trace, "Convolution"), "patch (")
        assert patch[1, 1] >= (128 / 255 - m.PIXEL_MEAN) / m.PIXEL_STD - FX


def test_the_position_is_on_the_ink_even_where_a_larger_gradient_lies_off_it():
    out = np.zeros((2, 5, 5))
    g = np.zeros((2, 5, 5))
    g[0, 0, 0] = -9.0                                  # the largest gradient, on the background
    g[1, 3, 2], g[0, 3, 3] = 0.5, -0.7                 # smaller ones on the stroke
    on_ink = np.zeros((5, 5), bool)
    on_ink[3, 1:4] = True
    assert tr.chosen_output(out, g, on_ink) == (0, 3, 3)
    assert tr.chosen_output(out, g, np.zeros((5, 5), bool)) == (0, 0, 0)     # no ink: the largest of all
    out[1, 3, 1] = 2.0                                  # no gradient on the ink: the largest output there
    assert tr.chosen_output(out, np.where(on_ink, 0, g), on_ink) == (1, 3, 1)


def test_ink_is_carried_through_a_pool_and_a_padding():
    x = np.full((1, 1, 28, 28), (0 - m.PIXEL_MEAN) / m.PIXEL_STD, np.float32)
    x[0, 0, 10, 6] = (200 / 255 - m.PIXEL_MEAN) / m.PIXEL_STD
    x[0, 0, 20, 20] = (127 / 255 - m.PIXEL_MEAN) / m.PIXEL_STD        # not ink: below 128
    ink = tr.ink_of(x, m.PIXEL_MEAN, m.PIXEL_STD)
    assert ink.sum() == 1 and ink[0, 0, 10, 6]
    twin = m.Network("conv4p1 relu pool conv4x5 relu fc10", np.random.default_rng(0))
    first = tr.ink_under_conv(twin, 0, ink)              # pad 1, centre 1: the same position
    assert first.shape == (28, 28) and np.argwhere(first).tolist() == [[10, 6]]
    second = tr.ink_under_conv(twin, 3, ink)             # pooled to (5, 3), then a 5x5 centred at +2
    assert second.shape == (10, 10) and np.argwhere(second).tolist() == [[3, 1]]


def test_the_blank_pixel_value_is_explained(small_mnist):
    """-0.4242, all over a patch of the background, is a blank pixel after the input scaling;
    a Fashion-MNIST network scales with its own mean and std, and says so."""
    _, _, (test_x, test_y) = small_mnist
    blank = m.to_input(np.zeros((1, 28, 28), np.uint8))[0, 0, 0, 0]
    for mean, std, shown in ((m.PIXEL_MEAN, m.PIXEL_STD, "-0.4242"), (0.2860, 0.3530, "-0.8102")):
        net = m.Network("seed", np.random.default_rng(0), mean=mean, std=std)
        lines = tr.trace_lines(net, m.to_input(test_x[:1], mean, std), int(test_y[0]))
        line = next(line for line in lines if "is a blank pixel after the input scaling" in line)
        assert line.startswith(f"{shown} is a blank pixel after the input scaling: "
                               f"(0 - {mean:.4f}) / {std:.4f};")
        assert abs(float(shown) - (0 - mean) / std) <= FX
    assert abs(blank - -0.4242) <= FX
