"""The optimizers against values worked out by hand, over several steps."""
import math

import numpy as np
import pytest

import mnist_net as m

GRADS = [np.array([1.0, -2.0]), np.array([0.5, 0.5]), np.array([0.0, 0.0]), np.array([-1.0, 4.0])]


def test_momentum_by_hand():
    opt = m.Momentum(2, lr=0.1, momentum=0.9, dtype=np.float64)
    # velocity: [1, -2] -> 0.9*[1, -2] + [0.5, 0.5] = [1.4, -1.3] -> [1.26, -1.17]
    expected = [[-0.1, 0.2], [-0.14, 0.13], [-0.126, 0.117]]
    for g, step in zip(GRADS, expected):
        np.testing.assert_allclose(opt.update(g), step, rtol=1e-12)


def test_adam_first_step_is_lr_times_sign():
    opt = m.Adam(2, lr=0.01, dtype=np.float64)
    # m_hat = g and v_hat = g^2 after one step, so the step is -lr * g / |g|
    np.testing.assert_allclose(opt.update(np.array([3.0, -0.002])), [-0.01, 0.01], rtol=1e-5)


def test_adam_by_hand_over_four_steps():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = m.Adam(2, lr=lr, betas=(b1, b2), eps=eps, dtype=np.float64)
    steps = [opt.update(g).copy() for g in GRADS]
    for i in range(2):                     # the same maths, one scalar at a time
        mean = var = 0.0
        for t, g in enumerate(GRADS, start=1):
            mean = b1 * mean + (1 - b1) * g[i]
            var = b2 * var + (1 - b2) * g[i] ** 2
            expected = -lr * (mean / (1 - b1 ** t)) / (math.sqrt(var / (1 - b2 ** t)) + eps)
            assert steps[t - 1][i] == pytest.approx(expected, rel=1e-9)
    # step 2 of the first parameter written out: m = 0.9*0.1 + 0.1*0.5 = 0.14,
    # v = 0.999*0.001 + 0.001*0.25 = 0.001249
    m_hat, v_hat = 0.14 / (1 - 0.9 ** 2), 0.001249 / (1 - 0.999 ** 2)
    assert steps[1][0] == pytest.approx(-lr * m_hat / (math.sqrt(v_hat) + eps), rel=1e-9)


def test_dual_adds_both_updates_with_separate_state():
    dual = m.Dual(2, adam_lr=0.01, sgd_lr=0.1, momentum=0.9, dtype=np.float64)
    adam = m.Adam(2, lr=0.01, dtype=np.float64)
    mom = m.Momentum(2, lr=0.1, momentum=0.9, dtype=np.float64)
    for g in GRADS:
        expected = adam.update(g).copy() + mom.update(g)
        np.testing.assert_allclose(dual.update(g), expected, rtol=1e-12)
    # the momentum part on its own: after the 4 gradients its velocity is [0.134, 2.947]
    np.testing.assert_allclose(dual.momentum.velocity, [0.9 * 1.26 - 1.0, 0.9 * -1.17 + 4.0])


def test_lr_scale_scales_the_step():
    a, b = m.Dual(2, dtype=np.float64), m.Dual(2, dtype=np.float64)
    g = np.array([0.3, -0.7])
    np.testing.assert_allclose(a.update(g, 0.25), 0.25 * b.update(g, 1.0), rtol=1e-12)


def test_cosine_schedule():
    assert m.cosine_scale(0, 100) == 1.0
    assert m.cosine_scale(50, 100) == pytest.approx(0.5)
    assert m.cosine_scale(100, 100) == pytest.approx(0.0, abs=1e-15)
    values = [m.cosine_scale(s, 10) for s in range(11)]
    assert all(x > y for x, y in zip(values, values[1:]))


@pytest.mark.parametrize("name, kind", [("adam", m.Adam), ("momentum", m.Momentum), ("dual", m.Dual)])
def test_make_optimizer(name, kind):
    assert isinstance(m.make_optimizer(name, 3), kind)
