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


def adam_by_hand(grads, lr, b1=0.9, b2=0.999, eps=1e-8, scales=None):
    """Adam's steps for one scalar parameter, one formula at a time, as in the paper."""
    mean = var = 0.0
    steps = []
    for t, g in enumerate(grads, start=1):
        mean = b1 * mean + (1 - b1) * g
        var = b2 * var + (1 - b2) * g ** 2
        scale = 1.0 if scales is None else scales[t - 1]
        steps.append(-lr * scale * (mean / (1 - b1 ** t)) / (math.sqrt(var / (1 - b2 ** t)) + eps))
    return steps


def test_adam_by_hand_over_four_steps():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = m.Adam(2, lr=lr, betas=(b1, b2), eps=eps, dtype=np.float64)
    steps = [opt.update(g).copy() for g in GRADS]
    for i in range(2):                     # the same maths, one scalar at a time
        expected = adam_by_hand([g[i] for g in GRADS], lr, b1, b2, eps)
        for t in range(4):
            assert steps[t][i] == pytest.approx(expected[t], rel=1e-9)
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


# --- AdamW ------------------------------------------------------------------------------
# PyTorch's AdamW, per parameter p with learning rate lr_t = lr * scale_t (the schedule):
#   p <- p * (1 - lr_t * wd)                      only where decay_mask is True
#   p <- p - lr_t * m_hat / (sqrt(v_hat) + eps)   Adam, on the gradient alone
W0 = [0.5, -1.0, 2.0]
MASK = [True, False, True]           # entry 1 plays a bias or batch-norm entry: never decayed
G3 = [[0.3, -0.2, 1.0], [-0.1, 0.4, 0.5], [0.2, 0.2, -2.0]]
SCALES = [1.0, 0.5, 0.25]            # a schedule: the decay shrinks with it


def adamw_by_hand(i, lr, wd):
    """Parameter i after each of the three steps, PyTorch's way (decay first, then Adam)."""
    p, adam, after = W0[i], adam_by_hand([g[i] for g in G3], lr, scales=SCALES), []
    for t in range(3):
        if MASK[i]:
            p *= 1 - lr * SCALES[t] * wd
        p += adam[t]
        after.append(p)
    return after


def test_adamw_by_hand_over_three_steps():
    lr, wd = 0.1, 0.2
    expected = [adamw_by_hand(i, lr, wd) for i in range(3)]
    # step 1 of entry 0 written out: decay 0.5 * (1 - 0.1*0.2), then Adam's first step -lr*sign(g)
    assert expected[0][0] == pytest.approx(0.5 * 0.98 - 0.1, rel=1e-6)     # eps: 1e-8 / 0.3
    w = np.array(W0)
    opt = m.AdamW(w, np.array(MASK), lr=lr, weight_decay=wd, dtype=np.float64)
    for t in range(3):
        w += opt.update(np.array(G3[t]), SCALES[t])          # w is the optimizer's params_flat
        np.testing.assert_allclose(w, [expected[i][t] for i in range(3)], rtol=1e-12)
    # the undecayed entry moved by Adam's steps alone
    assert w[1] == pytest.approx(W0[1] + sum(adam_by_hand([g[1] for g in G3], lr, scales=SCALES)), rel=1e-12)


def test_adamw_with_zero_decay_is_adam_exactly():
    w = np.array(W0)
    adamw = m.AdamW(w, np.ones(3, bool), lr=0.01, weight_decay=0.0, dtype=np.float64)
    adam = m.Adam(3, lr=0.01, dtype=np.float64)
    for g, s in zip(G3, SCALES):
        step = adamw.update(np.array(g), s)
        np.testing.assert_array_equal(step, adam.update(np.array(g), s))
        w += step


def test_adamw_decay_follows_the_schedule_and_the_mask():
    """With zero gradients Adam's part is 0: the step is the decay alone, -lr*scale*wd*w."""
    w = np.array(W0)
    opt = m.AdamW(w, np.array(MASK), lr=0.1, weight_decay=0.2, dtype=np.float64)
    for scale in (1.0, 0.5, 0.0):
        expected = np.where(MASK, -0.1 * scale * 0.2 * w, 0.0)
        step = opt.update(np.zeros(3), scale)
        np.testing.assert_allclose(step, expected, rtol=1e-12, atol=1e-300)
        w += step
    assert w[1] == W0[1]                                    # the masked-out entry never moved
    np.testing.assert_allclose(w[[0, 2]], np.array(W0)[[0, 2]] * (1 - 0.02) * (1 - 0.01), rtol=1e-12)


@pytest.mark.parametrize("spec", ["deep", "conv4 bn relu pool fc16 bn relu dropout0.5 fc10"])
def test_decay_mask_is_true_exactly_for_conv_and_dense_weights(spec):
    net = m.Network(spec, np.random.default_rng(0))
    assert sum(p.size for p in net.params.values()) == net.flat.size    # the views cover the vector
    for name, p in net.params.items():
        p[...] = name.endswith(".weight") and not name.startswith("bn")  # 1 where decayed, else 0
    np.testing.assert_array_equal(net.decay_mask, net.flat == 1)
    assert net.decay_mask.any() and not net.decay_mask.all()


def test_cosine_schedule():
    assert m.cosine_scale(0, 100) == 1.0
    assert m.cosine_scale(50, 100) == pytest.approx(0.5)
    assert m.cosine_scale(100, 100) == pytest.approx(0.0, abs=1e-15)
    values = [m.cosine_scale(s, 10) for s in range(11)]
    assert all(x > y for x, y in zip(values, values[1:]))


@pytest.mark.parametrize("name, kind", [("adam", m.Adam), ("adamw", m.AdamW), ("momentum", m.Momentum),
                                        ("dual", m.Dual)])
def test_make_optimizer(name, kind):
    net = m.Network("conv2 relu pool fc10", np.random.default_rng(0))
    opt = m.make_optimizer(name, net, adam_lr=0.002, sgd_lr=0.03, momentum=0.5, weight_decay=0.05)
    assert type(opt) is kind
    adam = opt.adam if name == "dual" else opt
    momentum = opt.momentum if name == "dual" else opt
    if name != "momentum":
        assert adam.lr == 0.002 and adam.m.size == net.flat.size
    if name in ("momentum", "dual"):
        assert (momentum.lr, momentum.mu, momentum.velocity.size) == (0.03, 0.5, net.flat.size)
    if name == "adamw":
        assert opt.params is net.flat                     # decays the weights the network uses
        np.testing.assert_allclose(opt.decay, np.where(net.decay_mask, 0.05, 0), rtol=1e-6)


def test_momentum_with_a_schedule_is_pytorchs_sgd():
    """PyTorch's SGD with momentum (no dampening, no Nesterov) under a learning-rate schedule:
    v = mu*v + g (the velocity holds no learning rate), p -= lr_t * v with lr_t = lr * scale."""
    opt = m.Momentum(2, lr=0.1, momentum=0.9, dtype=np.float64)
    p, v = np.array([1.0, 1.0]), np.zeros(2)
    expected_p = p.copy()
    for g, scale in zip(GRADS, [1.0, 0.5, 0.25, 0.0]):
        v = 0.9 * v + g
        expected_p -= 0.1 * scale * v
        p += opt.update(g, scale)
        np.testing.assert_allclose(p, expected_p, rtol=1e-12)
        np.testing.assert_allclose(opt.velocity, v, rtol=1e-12)
    # a step of scale 0 moves nothing, but the velocity still remembers every gradient
    np.testing.assert_allclose(opt.velocity, [0.9 * 1.26 - 1.0, 0.9 * -1.17 + 4.0], rtol=1e-12)


def test_adam_bias_correction_uses_the_power_t():
    """A constant gradient g: m and v climb towards g and g^2 as 1 - beta^t, and the bias
    corrections undo exactly that, so every step is -lr * g / (|g| + eps).  Corrections with
    beta instead of beta^t would give the right first step and then smaller ones."""
    opt = m.Adam(1, lr=0.01, dtype=np.float64)
    for t in range(1, 6):
        step = opt.update(np.array([0.5]))
        assert step[0] == pytest.approx(-0.01 * 0.5 / (0.5 + 1e-8), rel=1e-12), t
        assert opt.t == t
        assert opt.m[0] == pytest.approx(0.5 * (1 - 0.9 ** t), rel=1e-12)
        assert opt.v[0] == pytest.approx(0.25 * (1 - 0.999 ** t), rel=1e-12)


def test_adamw_from_make_optimizer_decays_only_conv_and_dense_weights():
    """With zero gradients an AdamW step is the decay alone: every conv and dense weight
    shrinks by the factor (1 - lr*wd), biases and batch norm's gamma and beta stay."""
    net = m.Network("conv4 bn relu pool fc16 bn relu fc10", np.random.default_rng(0), dtype=np.float64)
    net.params["bn1.weight"][...] = 1.5                    # not 1: a decay would show
    net.params["bn2.bias"][...] = 0.7
    before = {name: p.copy() for name, p in net.params.items()}
    opt = m.make_optimizer("adamw", net, adam_lr=0.1, weight_decay=0.2)
    for _ in range(2):
        net.flat += opt.update(np.zeros(net.flat.size))
    for name, p in net.params.items():
        decayed = name.endswith(".weight") and not name.startswith("bn")
        np.testing.assert_allclose(p, before[name] * (1 - 0.02) ** 2 if decayed else before[name], rtol=1e-12)
    assert {"conv1.weight", "fc1.weight", "fc2.weight"} == {
        name for name in net.params if not np.array_equal(net.params[name], before[name])}


@pytest.mark.parametrize("name", ["adam", "adamw", "momentum", "dual"])
def test_float32_steps_stay_float32(name):
    """A float32 network gets float32 steps: no silent float64 arrays the size of all the weights."""
    net = m.Network("conv2 relu pool fc10", np.random.default_rng(0))
    opt = m.make_optimizer(name, net)
    g = np.random.default_rng(1).standard_normal(net.flat.size).astype(np.float32)
    for _ in range(2):
        step = opt.update(g, 0.5)
        assert step.dtype == np.float32 and step.shape == net.flat.shape


def test_make_optimizer_builds_the_kinds_it_is_given():
    """kinds: the classes to build (the fast path passes its own), each with --optimizer's settings."""
    made = []

    def kind(label):
        return lambda *args, **kwargs: made.append((label, args, kwargs)) or label

    kinds = {name: kind(name) for name in ("dual", "adam", "adamw", "momentum")}
    net = m.Network("conv2 relu pool fc10", np.random.default_rng(0))
    for name in ("dual", "adam", "adamw", "momentum"):
        assert m.make_optimizer(name, net, 0.002, 0.03, 0.5, 0.05, kinds=kinds) == name
    sizes = [args[0] if not isinstance(args[0], np.ndarray) else args[0].size for _, args, _ in made]
    assert sizes == [net.flat.size] * 4
    assert made[0][1][1:] == (0.002, 0.03, 0.5) and made[1][1][1:] == (0.002,)
    assert made[2][1][0] is net.flat and made[2][1][1] is net.decay_mask and made[2][1][2:] == (0.002, 0.05)
    assert made[3][1][1:] == (0.03, 0.5)
