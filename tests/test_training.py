"""Training sanity checks: the first loss, overfitting, epochs, determinism."""
import math

import numpy as np
import pytest

import mnist_net as m
from conftest import synthetic_digits


def test_initial_loss_is_near_ln10():
    rng = np.random.default_rng(0)
    _, params = m.init_params(rng)
    images = rng.integers(0, 256, (256, 28, 28)).astype(np.uint8)
    logits, _ = m.forward(params, m.to_input(images))
    loss, _ = m.softmax_cross_entropy(logits, rng.integers(0, 10, 256))
    assert abs(loss - math.log(10)) < 0.15


def test_init_matches_pytorch_default_bounds():
    _, params = m.init_params(np.random.default_rng(0), filters=8, hidden=128)
    for name, fan_in in [("conv.weight", 9), ("conv.bias", 9), ("fc1.weight", 1352),
                         ("fc1.bias", 1352), ("fc2.weight", 128), ("fc2.bias", 128)]:
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(params[name]).max() <= bound
        assert np.abs(params[name]).max() > 0.9 * bound    # uses the whole range


def run_epochs(images, labels, epochs, optimizer="dual", seed=0, batch_size=20, schedule="constant"):
    rng = np.random.default_rng(seed)
    flat, params = m.init_params(rng, filters=4, hidden=32)
    opt = m.make_optimizer(optimizer, flat.size)
    steps = math.ceil(len(images) / batch_size) * epochs
    step, history = 0, []
    for _ in range(epochs):
        loss, acc, taken = m.train_epoch(params, flat, opt, images, labels, batch_size, rng,
                                         step, steps, schedule)
        step += taken
        history.append((loss, acc))
    return params, history


@pytest.mark.parametrize("optimizer", ["dual", "adam", "momentum"])
def test_overfits_100_examples(optimizer):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)   # noise: pure memorising
    labels = rng.integers(0, 10, 100).astype(np.uint8)
    epochs = {"dual": 25, "adam": 80, "momentum": 40}[optimizer]
    _, history = run_epochs(images, labels, epochs, optimizer)
    loss, acc = history[-1]
    assert acc == 1.0 and loss < 0.05, history[-1]
    assert history[0][0] > 1.0


def test_learns_synthetic_digits_and_cosine_schedule_runs():
    images, labels = synthetic_digits(400, 3)
    params, history = run_epochs(images, labels, 3, schedule="cosine")
    test_x, test_y = synthetic_digits(200, 4)
    acc, pred, probs = m.evaluate(params, test_x, test_y)
    assert acc > 0.95
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


def test_epoch_visits_every_example_once(monkeypatch):
    images = np.zeros((53, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(53)                          # each image carries its index
    labels = np.zeros(53, np.uint8)
    seen = []
    real = m.to_input

    def spy(batch, out=None):
        seen.extend(batch[:, 0, 0].tolist())
        return real(batch, out)

    monkeypatch.setattr(m, "to_input", spy)
    run_epochs(images, labels, 2, batch_size=10)
    assert sorted(seen[:53]) == list(range(53)) and sorted(seen[53:]) == list(range(53))
    assert seen[:53] != list(range(53)) and seen[:53] != seen[53:]   # shuffled, anew each epoch


def test_training_does_not_touch_callers_data():
    images, labels = synthetic_digits(60, 0)
    before = images.copy(), labels.copy()
    run_epochs(images, labels, 1)
    np.testing.assert_array_equal(images, before[0])
    np.testing.assert_array_equal(labels, before[1])


def test_same_seed_same_weights_other_seed_other_weights():
    images, labels = synthetic_digits(100, 1)
    a, _ = run_epochs(images, labels, 2, seed=7)
    b, _ = run_epochs(images, labels, 2, seed=7)
    c, _ = run_epochs(images, labels, 2, seed=8)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


def test_non_finite_loss_stops_training():
    images, labels = synthetic_digits(200, 2)
    rng = np.random.default_rng(0)
    flat, params = m.init_params(rng, filters=4, hidden=32)
    opt = m.make_optimizer("momentum", flat.size, sgd_lr=1e6)
    with pytest.raises(m.NonFiniteLoss), np.errstate(over="ignore", invalid="ignore"):
        for _ in range(5):
            m.train_epoch(params, flat, opt, images, labels, 20, rng, 0, 50, "constant")


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
    monkeypatch.setattr(m, "make_optimizer", lambda name, size, *a: spies.append(SpyOptimizer(size)) or spies[-1])
    args = m.parse_args(["--epochs", "3", "--batch-size", "64", "--schedule", schedule, "--quiet"])
    m.train(args, m.load_mnist(data_dir), out=lambda *a: None)
    scales = spies[0].scales
    assert len(scales) == 3 * 5                     # 300 images, batches of 64: 5 steps per epoch
    if schedule == "constant":
        assert scales == [1.0] * 15
    else:                                           # one cosine across the 3 epochs, not one per epoch
        np.testing.assert_allclose(scales, [0.5 * (1 + math.cos(math.pi * s / 15)) for s in range(15)])


def test_learning_rate_flags_reach_the_optimizer(monkeypatch, small_mnist):
    data_dir, _, _ = small_mnist
    made = []
    real = m.make_optimizer
    monkeypatch.setattr(m, "make_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    args = m.parse_args(["--epochs", "1", "--lr", "0.0007", "--sgd-lr", "0.03", "--momentum", "0.5", "--quiet"])
    m.train(args, m.load_mnist(data_dir), out=lambda *a: None)
    dual = made[0]
    assert (dual.adam.lr, dual.momentum.lr, dual.momentum.mu) == (0.0007, 0.03, 0.5)
