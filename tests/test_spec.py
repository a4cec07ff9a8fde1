"""The --net grammar: what it refuses (before any work, in one line), what it builds,
the shapes and parameter counts it reports, and the names it gives the layers."""
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

import mnist_net as m
from conftest import ROOT
from tools import command_line as cl

DEEP_SHAPES = [(16, 28, 28), (16, 28, 28), (16, 28, 28), (16, 14, 14),    # conv16p1 bn relu pool
               (32, 14, 14), (32, 14, 14), (32, 14, 14), (32, 7, 7),      # conv32p1 bn relu pool
               (1568,), (128,), (128,), (10,)]                            # flatten fc128 relu fc10


def build(spec):
    return m.Network(spec, np.random.default_rng(0))


# --- refused: exit 2, one line naming the token and what is wrong ------------------------
BAD_SPECS = [
    # (spec, the token named, words saying what is wrong)
    ("conv8 relu pooll fc10", "'pooll'", "not a layer (convF[xK][pP] bn relu pool dropoutP fcM)"),
    ("deeep", "'deeep'", "or preset (seed deep)"),                 # a misspelt preset: they are listed
    ("Conv8 relu pool fc10", "'Conv8'", "tokens are lower-case ('conv8')"),
    ("conv0 relu pool fc10", "'conv0'", "positive whole number"),
    ("conv8 pool fc0 fc10", "'fc0'", "positive whole number"),
    ("conv8.5 pool fc10", "'conv8.5'", "positive whole number"),
    ("conv8 pool fc-3 fc10", "'fc-3'", "positive whole number"),
    ("convx pool fc10", "'convx'", "positive whole number"),
    ("conv8x0 pool fc10", "'conv8x0'", "positive whole number"),
    ("conv8 dropout1 fc10", "'dropout1'", "at least 0 and below 1"),
    ("conv8 dropout1.5 fc10", "'dropout1.5'", "at least 0 and below 1"),
    ("conv8 dropout-0.1 fc10", "'dropout-0.1'", "at least 0 and below 1"),
    ("conv8 dropoutx fc10", "'dropoutx'", "drop probability"),
    ("conv8 dropout fc10", "'dropout'", "drop probability"),
    ("conv8x29 fc10", "'conv8x29'", "larger than its input map 28x28"),
    ("conv8x31p1 fc10", "'conv8x31p1'", "larger than its input map 28x28 padded by 1"),
    ("conv8 pool pool pool conv8x4 fc10", "'conv8x4'", "larger than its input map 3x3"),   # 26 13 6 3
    ("conv8 pool pool pool pool pool fc10", "'pool'", "at least 2x2, it gets 1x1"),        # 26 13 6 3 1
    ("conv8x28 pool fc10", "'pool'", "at least 2x2, it gets 1x1"),
    ("conv8 relu pool", "'pool'", "reaches the end: end with fc10"),
    ("conv8 pool fc12", "'fc12'", "last layer must be fc10"),
    ("conv8 pool fc10 relu", "'relu'", "last layer must be fc10"),
    ("conv8 pool fc32 conv8 fc10", "'conv8' after an fc", "needs a map"),
    ("conv8 fc32 pool fc10", "'pool' after an fc", "needs a map"),
    ("", "", "empty"),
    ("  ", "", "empty"),
    (",", "", "empty"),
]
BAD_IDS = [repr(spec) for spec, _, _ in BAD_SPECS]


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """main() with any data reading, fetching or training turned into a test failure."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    for name in ("load_mnist", "train", "choose_layers"):
        monkeypatch.setattr(m, name, forbidden)
    for name in ("fetch_missing_files", "load_model"):
        monkeypatch.setattr(cl, name, forbidden)
    empty = tmp_path / "data"
    empty.mkdir()
    return str(empty)


def refused(capsys, argv):
    """Exit code and the stderr lines of main(argv), which must stop in argument parsing."""
    with pytest.raises(SystemExit) as e:
        m.main(argv)
    out, err = capsys.readouterr()
    assert out == ""
    return e.value.code, err.splitlines()


@pytest.mark.parametrize("spec, token, what", BAD_SPECS, ids=BAD_IDS)
def test_bad_spec_is_refused_before_any_work_in_one_line(capsys, no_work, tmp_path, spec, token, what):
    log = tmp_path / "log.txt"
    code, lines = refused(capsys, ["--net", spec, "--data-dir", no_work, "--log-file", str(log)])
    assert code == 2
    assert len(lines) == 1, lines                          # no usage block, no traceback
    assert lines[0].startswith("mnist_net.py: error: --net: ")
    assert token in lines[0] and what in lines[0]
    assert os.listdir(no_work) == [] and not log.exists()


@pytest.mark.parametrize("spec, token, what", BAD_SPECS, ids=BAD_IDS)
def test_network_raises_spec_error_naming_the_token(spec, token, what):
    with pytest.raises(m.SpecError) as e:
        build(spec)
    assert token in str(e.value) and what in str(e.value)
    assert isinstance(e.value, ValueError)


def test_lower_case_hint_only_for_a_token_with_capitals():
    with pytest.raises(m.SpecError) as e:
        m.parse_layer("pooll")
    assert "lower-case" not in str(e.value) and "seed" in str(e.value) and "deep" in str(e.value)
    for token in ("Conv8", "RELU", "fC10"):
        with pytest.raises(m.SpecError, match=f"tokens are lower-case \\('{token.lower()}'\\)"):
            m.parse_layer(token)


@pytest.mark.parametrize("token", ["pooll", "conv0", "fc0", "conv8.5", "fc-3", "convx", "conv8x0",
                                   "conv8x3p", "dropout1", "dropout1.5", "dropoutx", "Conv8", "flatten"])
def test_parse_layer_refuses_bad_tokens(token):
    with pytest.raises(m.SpecError, match=f"'{token}'"):
        m.parse_layer(token)


def test_bad_spec_from_the_shell_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_net.py"), "--net", "conv8 relu pooll fc10",
                             "--data-dir", str(tmp_path / "nothing")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "'pooll': not a layer" in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("net", ["deep", "conv8 relu pool fc128 relu fc10", "conv16 pool fc10"])
@pytest.mark.parametrize("flag", [["--filters", "16"], ["--hidden", "64"]])
def test_filters_and_hidden_only_go_with_seed(capsys, no_work, net, flag):
    code, lines = refused(capsys, ["--net", net, "--data-dir", no_work] + flag)
    assert code == 2 and len(lines) == 1
    assert "--filters and --hidden" in lines[0] and "--net" in lines[0]


@pytest.mark.parametrize("argv, spec", [
    ([], "conv8 relu pool fc128 relu fc10"),
    (["--net", "seed"], "conv8 relu pool fc128 relu fc10"),
    (["--filters", "4"], "conv4 relu pool fc128 relu fc10"),
    (["--net", "seed", "--filters", "4", "--hidden", "16"], "conv4 relu pool fc16 relu fc10"),
    (["--net", "deep"], "conv16p1 bn relu pool conv32p1 bn relu pool fc128 relu fc10"),
    (["--net", "conv8,relu, pool ,fc10"], "conv8 relu pool fc10"),
    (["--net", " conv8\trelu\npool  fc10 "], "conv8 relu pool fc10"),
])
def test_presets_expand_and_commas_and_spaces_both_separate(argv, spec):
    assert cl.parse_args(argv).net == spec


def test_presets_are_the_networks_the_readme_describes():
    assert build("seed").spec == m.PRESETS["seed"] == "conv8 relu pool fc128 relu fc10"
    assert build("deep").spec == m.PRESETS["deep"]
    assert build(" deep ").shapes == DEEP_SHAPES


@pytest.mark.parametrize("token, parsed", [
    ("conv16", ("conv", (16, None, None))),
    ("conv16x5", ("conv", (16, 5, None))),
    ("conv16p1", ("conv", (16, None, 1))),
    ("conv16x5p2", ("conv", (16, 5, 2))),
    ("fc128", ("fc", (128,))),
    ("dropout0", ("dropout", (0.0,))),
    ("dropout0.5", ("dropout", (0.5,))),
    ("bn", ("bn", ())),
    ("relu", ("relu", ())),
    ("pool", ("pool", ())),
])
def test_parse_layer(token, parsed):
    assert m.parse_layer(token) == parsed


def test_kernel_and_padding_reach_the_conv():
    net = build("conv16x5p2 relu pool dropout0 fc10")
    conv, dropout = net.layers[0], net.layers[3]
    assert (conv.F, conv.C, conv.K, conv.pad) == (16, 1, 5, 2)
    assert net.params["conv1.weight"].shape == (16, 1, 5, 5)
    assert net.shapes[:4] == [(16, 28, 28), (16, 28, 28), (16, 14, 14), (16, 14, 14)]   # 28 + 2*2 - 5 + 1
    assert isinstance(dropout, m.Dropout) and dropout.p == 0.0
    assert build("conv8 dropout0.5 fc10").layers[1].p == 0.5


# --- shapes, parameter counts, names ------------------------------------------------------
def test_shapes_after_every_layer_of_deep():
    net = build("deep")
    assert net.shapes == DEEP_SHAPES
    assert net.tokens == ["conv16p1", "bn", "relu", "pool", "conv32p1", "bn", "relu", "pool",
                          "flatten", "fc128", "relu", "fc10"]
    assert net.params["fc1.weight"].shape == (128, 32 * 7 * 7)      # the flatten feeds fc1
    logits = net.forward(m.to_input(np.zeros((3, 28, 28), np.uint8)), train=False)
    assert logits.shape == (3, 10)


def test_shapes_with_odd_sizes_drop_the_last_row_and_column():
    net = build("conv8 pool pool pool fc10")
    assert net.shapes == [(8, 26, 26), (8, 13, 13), (8, 6, 6), (8, 3, 3), (72,), (10,)]
    assert net.params["fc1.weight"].shape == (10, 8 * 3 * 3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert net.forward(x, train=True).shape == (2, 10)


def test_a_dense_layer_can_take_the_image_itself_and_bn_follows_features():
    net = build("bn fc32 bn relu fc10")
    assert net.shapes == [(1, 28, 28), (784,), (32,), (32,), (32,), (10,)]
    assert net.params["bn1.weight"].shape == (1,) and net.params["bn2.weight"].shape == (32,)


@pytest.mark.parametrize("spec, count", [
    # conv8: 8*1*3*3 + 8 = 80;  fc128: 128*1352 + 128 = 173,184;  fc10: 10*128 + 10 = 1,290
    ("seed", 80 + 173_184 + 1_290),
    # conv16p1: 16*9 + 16 = 160; bn: 2*16 = 32; conv32p1: 32*16*9 + 32 = 4,640; bn: 64;
    # fc128: 128*1568 + 128 = 200,832; fc10: 1,290
    ("deep", 160 + 32 + 4_640 + 64 + 200_832 + 1_290),
    # conv16x5: 16*25 + 16 = 416 -> (16, 24, 24), pool (16, 12, 12); fc10: 10*2304 + 10 = 23,050
    ("conv16x5 relu pool dropout0.5 fc10", 416 + 23_050),
])
def test_parameter_counts(spec, count):
    net = build(spec)
    assert net.flat.size == net.grad.size == count
    assert sum(p.size for p in net.params.values()) == count
    assert m.describe(net)[-1].strip() == f"{count:,} parameters in all"


def test_layer_names_are_numbered_by_kind():
    net = build("deep")
    assert list(net.state) == [
        "conv1.weight", "conv1.bias",
        "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
        "conv2.weight", "conv2.bias",
        "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert list(net.params) == [n for n in net.state if not n.split(".")[1].startswith(("running", "num"))]
    assert list(net.grads) == list(net.params)
    assert net.state["bn2.running_var"].shape == (32,) and net.state["bn1.num_batches_tracked"].shape == ()
    assert list(build("conv4 pool fc8 bn fc10").params) == [
        "conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias", "bn1.weight", "bn1.bias",
        "fc2.weight", "fc2.bias"]


def test_params_and_grads_are_views_into_the_flat_vectors():
    net = build("conv4 bn relu pool fc10")
    for name in net.params:
        assert np.shares_memory(net.params[name], net.flat)
        assert np.shares_memory(net.grads[name], net.grad)
    net.flat[:] = 7
    assert all((p == 7).all() for p in net.params.values())


# --- the start-up description ---------------------------------------------------------------
@pytest.mark.parametrize("spec", ["seed", "deep", "conv8,relu,conv16x5p2 bn relu pool dropout0.25 fc64 relu fc10"])
def test_description_holds_a_spec_line_that_builds_the_same_network(spec):
    net = build(spec)
    lines = m.describe(net)
    spec_lines = [line for line in lines if line.startswith("network --net ")]
    assert len(spec_lines) == 1
    words = shlex.split(spec_lines[0])                  # as a shell would read the copied line
    assert words[:2] == ["network", "--net"] and len(words) == 3
    again = m.Network(cl.parse_args(["--net", words[2]]).net, np.random.default_rng(0))
    assert again.spec == net.spec and again.shapes == net.shapes
    assert {k: v.shape for k, v in again.state.items()} == {k: v.shape for k, v in net.state.items()}
    np.testing.assert_array_equal(again.flat, net.flat)          # same seed: the very same weights


def test_description_lists_every_layer_with_its_shape_name_and_parameters():
    lines = m.describe(build("deep"))
    assert lines[0] == 'network --net "conv16p1 bn relu pool conv32p1 bn relu pool fc128 relu fc10"'
    assert "(1, 28, 28)" in lines[1]
    body = lines[2:-1]
    assert len(body) == len(DEEP_SHAPES)
    for line, shape in zip(body, DEEP_SHAPES):
        assert str(shape) in line
    assert "conv16p1 (conv1)" in body[0] and body[0].rstrip().endswith("160 parameters")
    assert "bn (bn2)" in body[5] and body[5].rstrip().endswith("64 parameters")
    assert "fc128 (fc1)" in body[9] and body[9].rstrip().endswith("200,832 parameters")
    assert "parameters" not in body[2]                              # relu has none


def test_the_run_prints_the_description(small_mnist, tmp_path, capsys):
    data_dir, _, _ = small_mnist
    code = m.main(["--data-dir", data_dir, "--net", "conv4,relu,pool,fc10", "--epochs", "1",
                   "--log-file", str(tmp_path / "l.txt")])
    out = capsys.readouterr().out
    assert code == 0
    assert 'network --net "conv4 relu pool fc10"' in out
    assert "6,810 parameters in all" in out         # conv4: 4*9 + 4 = 40; fc10: 10*676 + 10 = 6,770


def test_deep_preset_brings_its_batch_size_unless_one_is_given():
    assert cl.parse_args(["--net", "deep"]).batch_size == m.DEEP_BATCH_SIZE == 64
    assert cl.parse_args(["--net", "deep", "--batch-size", "128"]).batch_size == 128
    assert cl.parse_args([]).batch_size == m.BATCH_SIZE == 128
    assert cl.parse_args(["--net", m.PRESETS["deep"]]).batch_size == 128     # the recipe goes with the name
