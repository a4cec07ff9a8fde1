"""Gradient checks: python3 mnist_net.py --gradcheck [--net SPEC]

Every backward pass of the chapter's layers (mnist_net.py) against centred finite
differences, in float64, on small random inputs: each layer kind on its own (the conv
plain, padded, with a 5x5 kernel and several input channels; the pool on an odd-sized map
and with ties; batch norm on maps, on features and in evaluation; dropout with a fixed
mask; ReLU, flatten, dense, softmax cross-entropy), then whole networks, parameter by
parameter: the --net network as given, or without --net the seed network (narrowed), a
learner's own (dropout, batch norm on features) and deep.

The fast path's layouts (fast_layers.py: pool order, work arrays) are not checked here:
tests/test_fast_path.py proves them equal to the chapter's layers.
"""
import textwrap

import numpy as np

import mnist_net as net

TOLERANCE = 1e-6
SAMPLES = 24          # entries checked per parameter of a whole network (all of them if fewer)
WIDTH = 100           # no printed line is longer

# the whole networks checked when no --net is given: (label, spec)
NETWORKS = [("seed", "conv2 relu pool fc6 relu fc10"),      # the seed network, narrowed
            ("own", "conv3 relu conv4x5p1 bn relu pool dropout0.3 fc8 bn relu fc10"),
            ("deep", net.PRESETS["deep"])]


def numeric_gradient(f, x, h=1e-6, indices=None):
    """Centred differences: df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / 2h, for every i of x
    (or only the flat indices given; the others stay 0).  Each entry is changed through x
    itself, so x may be a view in any memory order (a transposed map)."""
    grad = np.zeros(x.shape)
    for flat_index in range(x.size) if indices is None else indices:
        i = np.unravel_index(flat_index, x.shape)
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(a, b):
    """|a - b| / (|a| + |b|) over whole arrays (norms): 0 for equal arrays, 1 for unrelated ones."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-30))


def gradient_error(name, analytic, numeric, cancelled=False):
    """(check name, error): relative, except for a gradient that is truly 0 (the bias of a
    layer right before batch norm, which the normalisation cancels: cancelled=True).  There
    both sides are rounding noise (analytic below 1e-9, finite differences below 1e-7), so
    the check is the absolute difference."""
    if np.linalg.norm(analytic) < 1e-9 and np.linalg.norm(numeric) < 1e-7:
        why = ": batch norm cancels it" if cancelled else " for this batch"
        return f"{name} (0{why})", float(np.linalg.norm(analytic - numeric))
    return name, relative_error(analytic, numeric)


def standalone(layer, rng):
    """Give a layer its own float64 parameters (random) and gradient arrays, outside a network."""
    for name, shape in layer.shapes.items():
        layer.params[name] = rng.standard_normal(shape)
        layer.grads[name] = np.zeros(shape)
    for name, value in layer.buffers.items():
        layer.buffers[name] = value.astype(np.float64) if value.dtype.kind == "f" else value
    return layer


def layer_checks(name, layer, x, rng, mask_seed=None, train=True):
    """[(check, error)] for one layer: a scalar loss sum(out * r) has dout = r.

    mask_seed: the layer draws random numbers (dropout); each forward gets the same ones.
    train=False checks the backward of an evaluation forward (batch norm on running statistics).
    """
    def forward():
        if mask_seed is not None:
            layer.rng = np.random.default_rng(mask_seed)
        return layer.forward(x, train=train)

    r = rng.standard_normal(forward().shape)
    loss = lambda: float(np.sum(forward() * r))
    forward()
    dx = np.array(layer.backward(r, need_dx=True))
    grads = {k: g.copy() for k, g in layer.grads.items()}
    results = [(f"{name} {pname}", relative_error(grads[pname], numeric_gradient(loss, p)))
               for pname, p in layer.params.items()]
    results.append((f"{name} input", relative_error(dx, numeric_gradient(loss, x))))
    return results


def network_checks(name, spec, x, y, rng, dropout_seed=5):
    """[(check, error)] for every parameter of a whole network and for its input, against
    the softmax cross-entropy loss, in training mode (batch norm on batch statistics;
    dropout with one fixed mask)."""
    model = net.Network(spec, rng, dtype=np.float64)

    def same_masks():
        for layer in model.layers:
            if isinstance(layer, net.Dropout):
                layer.rng = np.random.default_rng(dropout_seed)

    def loss():
        same_masks()
        return net.softmax_cross_entropy(model.forward(x, train=True), y)[0]

    same_masks()
    logits = model.forward(x, train=True)
    dx = np.array(model.backward(net.softmax_cross_entropy(logits, y)[1], input_grad=True))
    grads = {k: g.copy() for k, g in model.grads.items()}
    prefixes = {id(layer): prefix for prefix, layer in model.named}
    before_bn = {f"{prefixes[id(a)]}.bias" for a, b in zip(model.layers, model.layers[1:])
                 if a.kind in ("conv", "fc") and b.kind == "bn"}
    results = []
    for pname, p in model.params.items():
        picked = None if p.size <= SAMPLES else rng.choice(p.size, SAMPLES, replace=False)
        numeric = numeric_gradient(loss, p, indices=picked)
        analytic = grads[pname] if picked is None else grads[pname].reshape(-1)[picked]
        numeric = numeric if picked is None else numeric.reshape(-1)[picked]
        results.append(gradient_error(f"{name} {pname}", analytic, numeric, pname in before_bn))
    picked = rng.choice(x.size, SAMPLES, replace=False)
    numeric = numeric_gradient(loss, x, indices=picked).reshape(-1)[picked]
    results.append((f"{name} input", relative_error(dx.reshape(-1)[picked], numeric)))
    return results


def layer_gradient_checks(rng):
    """[(check name, error)] for each layer kind of the chapter on its own."""
    results = []
    # convolutions: plain; padded with several input channels and a 5x5 kernel; padded, odd-sized
    results += layer_checks("conv", standalone(net.Conv(1, 3), rng), rng.standard_normal((2, 1, 7, 6)), rng)
    results += layer_checks("conv 5x5 pad 2, 2 channels", standalone(net.Conv(2, 3, 5, 2), rng),
                            rng.standard_normal((2, 2, 6, 5)), rng)
    results += layer_checks("conv pad 1, 3 channels", standalone(net.Conv(3, 2, 3, 1), rng),
                            rng.standard_normal((3, 3, 5, 4)), rng)
    # ReLU, away from its kink at 0
    x = rng.standard_normal((4, 3, 5, 5))
    x[np.abs(x) < 0.01] = 0.5
    results += layer_checks("relu", net.ReLU(), x, rng)
    # max-pool: on an odd-sized map (its last row and column dropped), then windows with tied maxima
    results += layer_checks("maxpool 5x5", net.MaxPool(), rng.standard_normal((2, 3, 5, 5)), rng)
    results.append(("maxpool with ties", tied_pool_error(rng)))
    # batch norm after a conv (per channel) and after a dense layer (per feature), then in evaluation
    results += layer_checks("bn on maps", standalone(net.BatchNorm(3), rng), rng.standard_normal((4, 3, 5, 5)), rng)
    results += layer_checks("bn on features", standalone(net.BatchNorm(6), rng), rng.standard_normal((5, 6)), rng)
    bn = standalone(net.BatchNorm(3), rng)
    bn.buffers["running_mean"][...] = rng.standard_normal(3)
    bn.buffers["running_var"][...] = rng.uniform(0.5, 2, 3)
    results += layer_checks("bn in evaluation", bn, rng.standard_normal((4, 3, 5, 5)), rng, train=False)
    # dropout with a fixed mask
    results += layer_checks("dropout 0.4", net.Dropout(0.4, rng), rng.standard_normal((5, 3, 4, 4)), rng,
                            mask_seed=3)
    # flatten, dense
    results += layer_checks("flatten", net.Flatten(), rng.standard_normal((2, 3, 4, 5)), rng)
    results += layer_checks("dense", standalone(net.Dense(7, 4), rng), rng.standard_normal((5, 7)), rng)
    # softmax cross-entropy
    z, y = rng.standard_normal((6, 10)) * 3, rng.integers(0, 10, 6)
    results.append(("softmax cross-entropy", relative_error(
        net.softmax_cross_entropy(z, y)[1], numeric_gradient(lambda: net.softmax_cross_entropy(z, y)[0], z))))
    return results


def tied_pool_error(rng):
    """Windows whose four values tie (a blank border): the gradient goes to the first
    position in reading order only; one window has a clear winner elsewhere."""
    pool = net.MaxPool()
    a = np.zeros((2, 3, 4, 4))                         # (N, C, H, W), every window tied ...
    a[:, :, 1, 1] = 1.0                                # ... but window (0, 0): bottom-right wins
    r = rng.standard_normal((2, 3, 2, 2))
    pool.forward(a)
    da = pool.backward(r)
    expected = np.zeros_like(a)
    expected[:, :, ::2, ::2] = r                       # ties: all to the top-left position
    expected[:, :, 0, 0] = 0
    expected[:, :, 1, 1] = r[:, :, 0, 0]
    return relative_error(da, expected)


def gradient_check_sections(seed=0, spec=None):
    """[(heading, [(check name, error)])]: the layers, then each whole network: `spec` as
    given (its checks named "net ..."), or without one the NETWORKS."""
    rng = np.random.default_rng(seed)
    sections = [("each layer on its own, in float64, against centred differences:",
                 layer_gradient_checks(rng))]
    x, y = rng.standard_normal((3, 1, 28, 28)), np.array([3, 8, 1])
    for label, net_spec in [("net", spec)] if spec else NETWORKS:
        model = net.Network(net_spec, np.random.default_rng(0))          # the spec as it reads
        sections.append((f"whole network {label}: --net \"{model.spec}\"",
                         network_checks(label, net_spec, x, y, rng)))
    return sections


def gradient_checks(seed=0, spec=None):
    """[(check name, error)] for every backward pass, each against centred differences in float64."""
    return [check for _, checks in gradient_check_sections(seed, spec) for check in checks]


def wrapped(text):
    """text as lines of at most WIDTH columns, broken at spaces, every line after the first indented."""
    return textwrap.wrap(text, WIDTH, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)


def run_gradient_checks(out=print, spec=None):
    """Print a heading per section and one line per check (the layers, then the network
    `spec` as given, or seed, own and deep); return 1 if any error is above the tolerance,
    else 0.  No line is longer than WIDTH columns."""
    failed = []
    for heading, checks in gradient_check_sections(spec=spec):
        for line in wrapped(heading):
            out(line)
        for name, error in checks:
            ok = error <= TOLERANCE
            out(f"{'ok    ' if ok else 'FAILED'}  {name:44s} error {error:.2e}")
            if not ok:
                failed.append(name)
    if failed:
        for line in wrapped(f"{len(failed)} check(s) above {TOLERANCE:g}: look at the backward pass of "
                            + ", ".join(failed)):
            out(line)
        return 1
    out(f"all gradient checks within {TOLERANCE:g}")
    return 0
