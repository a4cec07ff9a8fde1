"""Training sanity checks: the first loss, the initial weights, overfitting, epochs,
determinism, the schedule, training and evaluation modes, saving and loading."""
import math

import numpy as np
import pytest

import mnist_net as m
from conftest import synthetic_digits
from reference import network_naive
from tools import model_files
from tools.command_line import parse_args

SMALL = "conv4 relu pool fc32 relu fc10"                 # the seed network, narrower: fast
SMALL_BN = "conv4 bn relu pool dropout0.25 fc32 bn relu dropout0.25 fc10"


@pytest.mark.parametrize("spec", ["seed", "deep"])
def test_initial_loss_is_near_ln10(spec):
    rng = np.random.default_rng(0)
    net = m.Network(spec, rng)
    images = rng.integers(0, 256, (256, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, 256)
    for train in (True, False):
        loss, _ = m.softmax_cross_entropy(net.forward(m.to_input(images), train), labels)
        assert abs(loss - math.log(10)) < 0.15, (train, loss)


# fan_in: the inputs one output unit sees, C*K*K for a conv, the input width for a dense layer
FAN_IN = {
    "seed": {"conv1": 1 * 3 * 3, "fc1": 8 * 13 * 13, "fc2": 128},
    "deep": {"conv1": 1 * 3 * 3, "conv2": 16 * 3 * 3, "fc1": 32 * 7 * 7, "fc2": 128},
}


@pytest.mark.parametrize("spec", ["seed", "deep"])
def test_init_matches_pytorch_default_bounds(spec):
    net = m.Network(spec, np.random.default_rng(0))
    learned = set()
    for layer, fan_in in FAN_IN[spec].items():
        bound = 1 / math.sqrt(fan_in)
        for kind in ("weight", "bias"):
            p = net.params[f"{layer}.{kind}"]
            assert np.abs(p).max() <= bound
            if p.size >= 50:                                # uniform over the whole range
                assert np.abs(p).max() > 0.95 * bound
                assert abs(p.mean()) < 0.1 * bound and abs(p.std() - bound / math.sqrt(3)) < 0.1 * bound
            else:                                           # 8 to 32 biases: not a narrower range
                assert np.abs(p).max() > 0.5 * bound
            learned.add(f"{layer}.{kind}")
    for name, a in net.state.items():
        if name.startswith("bn"):
            expected = {"weight": 1, "bias": 0, "running_mean": 0, "running_var": 1,
                        "num_batches_tracked": 0}[name.split(".")[1]]
            np.testing.assert_array_equal(a, expected)
        else:
            assert name in learned                           # every conv and fc array was checked


def run_epochs(images, labels, epochs, optimizer="dual", seed=0, batch_size=20, schedule="constant",
               spec=SMALL, **opt_args):
    rng = np.random.default_rng(seed)
    net = m.Network(spec, rng)
    opt = m.make_optimizer(optimizer, net, **opt_args)
    steps = math.ceil(len(images) / batch_size) * epochs
    step, history = 0, []
    for _ in range(epochs):
        loss, acc, taken = m.train_epoch(net, opt, images, labels, batch_size, rng, step, steps, schedule)
        step += taken
        history.append((loss, acc))
    return net, history


@pytest.mark.parametrize("optimizer", ["dual", "adam", "adamw", "momentum"])
def test_overfits_100_examples(optimizer):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)   # noise: pure memorising
    labels = rng.integers(0, 10, 100).astype(np.uint8)
    epochs = {"dual": 25, "adam": 80, "adamw": 80, "momentum": 40}[optimizer]
    _, history = run_epochs(images, labels, epochs, optimizer)
    loss, acc = history[-1]
    assert acc == 1.0 and loss < 0.05, history[-1]
    assert history[0][0] > 1.0


@pytest.mark.parametrize("spec", ["seed", SMALL_BN])
def test_learns_synthetic_digits_and_cosine_schedule_runs(small_mnist, spec):
    train_x, train_y, test_x, test_y = m.load_mnist(small_mnist[0])
    net, history = run_epochs(train_x, train_y, 3, schedule="cosine", spec=spec)
    acc, pred, probs = m.evaluate(net, test_x, test_y)
    assert acc > 0.95, history
    assert history[-1][0] < history[0][0]
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(pred, probs.argmax(axis=1))


def test_epoch_visits_every_example_once(monkeypatch):
    images = np.zeros((53, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(53)                          # each image carries its index
    labels = np.zeros(53, np.uint8)
    seen = []
    real = m.to_input

    def spy(batch, *scaling):
        seen.extend(batch[:, 0, 0].tolist())
        return real(batch, *scaling)

    monkeypatch.setattr(m, "to_input", spy)
    run_epochs(images, labels, 2, batch_size=10)
    assert len(seen) == 2 * 53
    assert sorted(seen[:53]) == list(range(53)) and sorted(seen[53:]) == list(range(53))
    assert seen[:53] != list(range(53)) and seen[:53] != seen[53:]   # shuffled, anew each epoch


def test_training_does_not_touch_callers_data():
    images, labels = synthetic_digits(60, 0)
    before = images.copy(), labels.copy()
    run_epochs(images, labels, 1, spec=SMALL_BN)
    np.testing.assert_array_equal(images, before[0])
    np.testing.assert_array_equal(labels, before[1])


@pytest.mark.parametrize("spec", [SMALL, SMALL_BN])
def test_same_seed_same_weights_other_seed_other_weights(spec):
    images, labels = synthetic_digits(100, 1)
    a, _ = run_epochs(images, labels, 2, seed=7, spec=spec)
    b, _ = run_epochs(images, labels, 2, seed=7, spec=spec)
    c, _ = run_epochs(images, labels, 2, seed=8, spec=spec)
    assert list(a.state) == list(b.state)
    for name in a.state:
        np.testing.assert_array_equal(a.state[name], b.state[name])
    assert not np.array_equal(a.state["fc1.weight"], c.state["fc1.weight"])


def test_non_finite_loss_stops_training():
    images, labels = synthetic_digits(200, 2)
    rng = np.random.default_rng(0)
    net = m.Network(SMALL, rng)
    opt = m.make_optimizer("momentum", net, sgd_lr=1e6)
    with pytest.raises(m.NonFiniteLoss), np.errstate(over="ignore", invalid="ignore"):
        for _ in range(5):
            m.train_epoch(net, opt, images, labels, 20, rng, 0, 50, "constant")


class SpyOptimizer:
    """Records the learning-rate factor of every step, changes nothing."""

    def __init__(self, size):
        self.scales, self.zero = [], np.zeros(size, np.float32)

    def update(self, g, lr_scale=1.0):
        self.scales.append(lr_scale)
        return self.zero


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_runs_once_over_all_steps_of_all_epochs(monkeypatch, small_mnist, schedule):
    data_dir, _, _ = small_mnist
    spies = []
    monkeypatch.setattr(m, "make_optimizer",
                        lambda name, net, *a: spies.append(SpyOptimizer(net.flat.size)) or spies[-1])
    args = parse_args(["--epochs", "3", "--batch-size", "64", "--schedule", schedule, "--quiet"])
    m.train(args, m.load_mnist(data_dir), out=lambda *a: None)
    scales = spies[0].scales
    assert len(scales) == 3 * 5                     # 300 images, batches of 64: 5 steps per epoch
    if schedule == "constant":
        assert scales == [1.0] * 15
    else:                                           # one cosine across the 3 epochs, not one per epoch
        np.testing.assert_allclose(scales, [0.5 * (1 + math.cos(math.pi * s / 15)) for s in range(15)])


@pytest.mark.parametrize("optimizer", ["dual", "adamw"])
def test_learning_rate_flags_reach_the_optimizer(monkeypatch, small_mnist, optimizer):
    data_dir, _, _ = small_mnist
    made = []
    real = m.make_optimizer
    monkeypatch.setattr(m, "make_optimizer", lambda *a: made.append((a[1], real(*a))) or made[-1][1])
    args = parse_args(["--epochs", "1", "--lr", "0.0007", "--sgd-lr", "0.03", "--momentum", "0.5",
                         "--optimizer", optimizer, "--weight-decay", "0.05", "--quiet"])
    net, _, _ = m.train(args, m.load_mnist(data_dir), out=lambda *a: None)
    (net_given, opt), = made
    assert net_given is net
    if optimizer == "dual":
        assert (opt.adam.lr, opt.momentum.lr, opt.momentum.mu) == (0.0007, 0.03, 0.5)
    else:
        assert isinstance(opt, m.AdamW) and opt.lr == 0.0007 and opt.params is net.flat
        np.testing.assert_allclose(opt.decay, np.where(net.decay_mask, 0.05, 0.0), rtol=1e-6)


def test_weight_decay_shrinks_the_weights_and_only_them():
    """The same run with and without a strong decay: the conv and dense weights end up
    smaller, the biases (outside decay_mask) about as large as without it."""
    images, labels = synthetic_digits(100, 1)
    plain, _ = run_epochs(images, labels, 2, "adamw", spec=SMALL, weight_decay=0.0)
    decayed, _ = run_epochs(images, labels, 2, "adamw", spec=SMALL, weight_decay=2.0)
    for name in ("conv1.weight", "fc1.weight", "fc2.weight"):
        assert np.linalg.norm(decayed.state[name]) < 0.99 * np.linalg.norm(plain.state[name])
    ratio = np.linalg.norm(decayed.flat[~decayed.decay_mask]) / np.linalg.norm(plain.flat[~plain.decay_mask])
    assert 0.8 < ratio < 1.25                               # the biases are not pulled to 0


@pytest.mark.parametrize("spec", ["relu conv3 pool fc10", "dropout0.2 conv3 relu pool fc10", "pool conv3 fc10",
                                  "bn conv3 pool fc10"])
def test_layers_without_parameters_may_come_first(spec):
    """The grammar accepts a layer with nothing to learn in front of the first conv; a
    training step must then work, and its gradients be right (centred differences)."""
    rng = np.random.default_rng(0)
    net = m.Network(spec, rng, dtype=np.float64)
    x = rng.standard_normal((3, 1, 28, 28))
    y = np.array([1, 7, 3])
    m.loss_and_grads(net, x, y)                             # with dropout on
    for layer in net.layers:
        if isinstance(layer, m.Dropout):
            layer.p = 0.0                                   # a fixed function, for the differences
    m.loss_and_grads(net, x, y)
    for name in ("conv1.weight", "fc1.bias"):
        p, g = net.params[name].reshape(-1), net.grads[name].reshape(-1).copy()
        for i in (0, p.size // 2, p.size - 1):
            old = p[i]
            p[i] = old + 1e-6
            plus = m.softmax_cross_entropy(net.forward(x, True), y)[0]
            p[i] = old - 1e-6
            minus = m.softmax_cross_entropy(net.forward(x, True), y)[0]
            p[i] = old
            assert g[i] == pytest.approx((plus - minus) / 2e-6, rel=1e-5, abs=1e-9)


# --- training and evaluation modes -------------------------------------------------------
def trained_net(spec, steps=6, seed=0):
    """A network after a few steps on synthetic digits: batch norm's running statistics
    and gamma, beta have moved away from their starting values."""
    images, labels = synthetic_digits(20 * steps, seed)
    net, _ = run_epochs(images, labels, 1, "adam", seed=seed, spec=spec)
    return net


def test_evaluation_uses_running_statistics_not_the_batch():
    net = trained_net("conv4 bn relu pool fc16 bn relu fc10")
    assert int(net.state["bn1.num_batches_tracked"]) == 6
    assert not np.allclose(net.state["bn1.running_mean"], 0) and not np.allclose(net.state["bn2.running_var"], 1)
    images, _ = synthetic_digits(9, 11)
    state = {k: v.copy() for k, v in net.state.items()}
    together = m.predict_proba(net, images)
    alone = np.concatenate([m.predict_proba(net, images[i:i + 1]) for i in range(9)])
    other_company = m.predict_proba(net, np.concatenate([images[:1], 255 - images[1:]]))[0]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other_company, together[0], rtol=1e-5, atol=1e-6)
    for name, a in net.state.items():                       # evaluating changed nothing
        np.testing.assert_array_equal(a, state[name])
    # the running statistics, as PyTorch's eval() would use them
    x = m.to_input(images).astype(np.float64)
    expected = np.exp(m.log_softmax(network_naive(net, x, train=False)))
    np.testing.assert_allclose(together, expected, rtol=1e-4, atol=1e-6)
    # and the test above can fail: in training mode the batch does change image 0's logits
    first = net.forward(m.to_input(images), train=True)[0].copy()
    first_alone = net.forward(m.to_input(np.concatenate([images[:1], 255 - images[1:]])), train=True)[0]
    assert not np.allclose(first, first_alone, rtol=1e-3)


def test_running_statistics_follow_pytorch_update():
    """running = 0.9 * running + 0.1 * batch statistic, the variance unbiased (M - 1)."""
    net = m.Network("bn fc10", np.random.default_rng(0), dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((5, 1, 28, 28)) * 3 + 2
    net.forward(x, train=True)
    np.testing.assert_allclose(net.state["bn1.running_mean"], 0.1 * x.mean(), rtol=1e-10)
    np.testing.assert_allclose(net.state["bn1.running_var"], 0.9 + 0.1 * x.var(ddof=1), rtol=1e-10)
    assert int(net.state["bn1.num_batches_tracked"]) == 1


def test_dropout_is_off_in_evaluation_and_on_in_training():
    spec = "conv4 relu pool dropout0.5 fc32 relu dropout0.5 fc10"
    rng = np.random.default_rng(0)
    net = m.Network(spec, rng)
    images, _ = synthetic_digits(8, 3)
    before = rng.bit_generator.state
    a, b = m.predict_proba(net, images), m.predict_proba(net, images)
    assert rng.bit_generator.state == before                  # evaluation draws no masks
    np.testing.assert_array_equal(a, b)
    x = m.to_input(images)
    expected = np.exp(m.log_softmax(network_naive(net, x.astype(np.float64))))   # no dropout at all
    np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-6)
    one = net.forward(x, train=True).copy()
    two = net.forward(x, train=True)
    assert not np.allclose(one, two)                          # a fresh mask every step
    assert rng.bit_generator.state != before


def test_dropout_draws_from_the_runs_one_generator(monkeypatch, small_mnist):
    """train() hands every dropout layer the generator that shuffles and made the weights;
    the same seed then repeats the run exactly, masks included, and another seed does not."""
    data_dir, _, _ = small_mnist
    data = m.load_mnist(data_dir)
    seen = []
    real = m.train_epoch

    def spy(net, opt, train_x, train_y, batch_size, rng, *rest):
        seen.append((net, rng))
        return real(net, opt, train_x, train_y, batch_size, rng, *rest)

    monkeypatch.setattr(m, "train_epoch", spy)
    runs = []
    for seed in (3, 3, 4):
        args = parse_args(["--net", "conv4 relu pool dropout0.5 fc32 relu dropout0.2 fc10", "--epochs", "2",
                             "--batch-size", "64", "--seed", str(seed), "--quiet"])
        net, history, _ = m.train(args, data, out=lambda *a: None)
        dropouts = [layer for layer in net.layers if isinstance(layer, m.Dropout)]
        assert len(dropouts) == 2 and all(d.rng is seen[-1][1] for d in dropouts)
        assert seen[-1][0] is net and seen[-2][1] is seen[-1][1]        # one generator for both epochs
        runs.append((net, history, [d.mask.copy() for d in dropouts]))
    (a, ha, ma), (b, hb, mb), (c, _, mc) = runs
    assert [(h["loss"], h["train_accuracy"]) for h in ha] == [(h["loss"], h["train_accuracy"]) for h in hb]
    np.testing.assert_array_equal(a.flat, b.flat)
    for x, y in zip(ma, mb):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(ma[0], mc[0]) and not np.array_equal(a.flat, c.flat)


def test_dropout_keeps_the_expected_value():
    """Inverted dropout: values kept with probability 1 - p are scaled by 1/(1 - p)."""
    net = m.Network("dropout0.25 fc10", np.random.default_rng(0))
    x = np.ones((64, 1, 28, 28), np.float32)
    out = net.layers[0].forward(x, train=True)
    assert set(np.unique(out).tolist()) == {0.0, np.float32(1 / 0.75)}
    assert abs((out == 0).mean() - 0.25) < 0.01
    assert abs(out.mean() - 1) < 0.02


# --- saving and loading ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["seed", "conv4p1 bn relu pool fc16 bn relu dropout0.5 fc10"])
def test_save_then_load_gives_the_same_state_and_predictions(tmp_path, spec):
    net = trained_net(spec)
    path = tmp_path / "m.npz"
    model_files.save_model(str(path), net, "a config line")
    with np.load(path) as f:
        files = set(f.files)
        assert str(f["spec"]) == net.spec and str(f["config"]) == "a config line"
        assert f["input_mean"] == m.PIXEL_MEAN and f["input_std"] == m.PIXEL_STD     # exactly: float64
    assert files == set(net.state) | {"spec", "dataset", "input_mean", "input_std", "config"}
    loaded = model_files.load_model(str(path))
    assert loaded.spec == net.spec and list(loaded.state) == list(net.state)
    for name, a in net.state.items():
        np.testing.assert_array_equal(loaded.state[name], a)
        assert loaded.state[name].dtype == a.dtype
    images, _ = synthetic_digits(50, 9)
    np.testing.assert_array_equal(m.predict_proba(loaded, images), m.predict_proba(net, images))


def test_loaded_network_trains_on_with_its_own_views(tmp_path):
    """The loaded values went into the flat vector the optimizer updates, not beside it."""
    net = trained_net("conv4 bn relu pool fc10")
    path = tmp_path / "m.npz"
    model_files.save_model(str(path), net, "")
    loaded = model_files.load_model(str(path))
    np.testing.assert_array_equal(loaded.flat, net.flat)
    for name in loaded.params:
        assert np.shares_memory(loaded.params[name], loaded.flat)
    assert loaded.layers[1].buffers["num_batches_tracked"] is loaded.state["bn1.num_batches_tracked"]
