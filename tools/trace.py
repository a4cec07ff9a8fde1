"""One test image through the network, forward then backward, with numbers to redo by hand:

    python3 mnist_net.py --trace 0                          # after training
    python3 mnist_net.py --load-model m.npz --trace 0       # or on a saved model

The trace is one training step on a batch of just this image: training mode, so batch norm
normalises with this image's own statistics (per channel, over its H*W positions) and dropout
draws a mask, exactly what the backward pass is the gradient of.  It runs on a copy of the
network made of the chapter's layers (mnist_net.Network, whatever the run trained with), so the
step changes nothing of the network itself, and walks the copy's list of layers with their own
forward and backward, one layer at a time (the calls Network.forward and Network.backward make),
keeping what each layer hands on.  Every number printed is read from those outputs, from the
layers' caches and gradients, or made by the program's own functions (log_softmax,
softmax_cross_entropy); the only arithmetic done here is what a learner is asked to redo
(products, their sum, a difference, a batch mean), shown next to the program's result.

The convolution shown is at a position on the stroke (the input pixel under the filter's centre
is ink, 128 of 255 or more), where the digit is: on the blank background every pixel of a patch
is the same number and every window of the pool a tie.
"""
import textwrap

import numpy as np

import mnist_net as m
from tools.model_files import chapter_copy

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")   # a pool window, in reading order
ALL_TERMS = 48          # a weight gradient with at most this many nonzero terms is listed in full
TOP_TERMS = 8           # else its largest terms, then the sum of the others
INK_LEVEL = 128         # a pixel is ink when at least half bright (of 255): the stroke, not its soft edge
WIDTH = 100             # columns every printed line fits in


def fx(v):
    """A forward value (pixel, weight, activation, logit): 4 decimals."""
    return f"{v + 0.0:.4f}"


def gx(v):
    """A gradient: 4 significant digits, in powers of 10 (they are often 1e-5 or smaller)."""
    return f"{v + 0.0:.3e}"                               # + 0.0: no "-0.000e+00"


def wrap(text, indent=""):
    """A paragraph as lines of at most WIDTH columns (flags and numbers never split)."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def grid(a, fmt=fx, indent="      "):
    """A small matrix as aligned lines: columns 10 wide, narrower if a row would not fit WIDTH."""
    a = np.atleast_2d(a)
    w = 10 if len(indent) + 11 * a.shape[1] <= WIDTH else max(len(fmt(v)) for v in a.flat)
    return [indent + " ".join(f"{fmt(v):>{w}s}" for v in row) for row in a]


def walk(twin, x, y):
    """One training step of the twin on x (1, C, H, W), label y, layer by layer.

    Returns a dict: ins[k] and outs[k], the input and output of layer k; dins[k] and
    douts[k], the gradient of the loss w.r.t. them; the caches the trace shows, the loss,
    the logits and dlogits.  The chapter's layers hand out fresh arrays and keep their
    caches until their next forward, so nothing needs copying.
    """
    layers = twin.layers
    ins, outs, caches = [], [], {}
    h = x
    for k, layer in enumerate(layers):
        ins.append(h)
        h = layer.forward(h, True)
        outs.append(h)
        if layer.kind == "conv":
            caches[k] = {"cols": layer.cols}                          # (C*K*K, N*Ho*Wo)
        elif layer.kind == "bn":
            caches[k] = {"xhat": layer.xhat, "inv_std": layer.inv_std.reshape(-1), "M": layer.M,
                         "axes": layer.axes}
        elif layer.kind == "pool":
            caches[k] = {"won": (layer.right_won_top, layer.right_won_bottom, layer.bottom_won)}
    loss, dlogits = m.softmax_cross_entropy(h, np.array([y]))
    douts, dins = [None] * len(layers), [None] * len(layers)
    d = dlogits
    for k in reversed(range(len(layers))):
        douts[k] = d
        d = layers[k].backward(d, need_dx=True)
        dins[k] = d
    grads = {name: np.array(g) for name, g in twin.grads.items()}
    return {"ins": ins, "outs": outs, "douts": douts, "dins": dins, "caches": caches,
            "loss": loss, "logits": outs[-1][0], "dlogits": dlogits[0], "grads": grads}


def names_of(net):
    """Layer index -> its state_dict prefix (conv1, bn1, fc2, ...), for layers with parameters."""
    prefix = {id(layer): name for name, layer in net.named}
    return [prefix.get(id(layer)) for layer in net.layers]


def first(twin, kind):
    return next((k for k, layer in enumerate(twin.layers) if layer.kind == kind), None)


def only_elementwise_between(twin, a, b):
    """True if the layers strictly between a and b keep every value where it is (relu, bn, dropout)."""
    return all(layer.kind in ("relu", "bn", "dropout") for layer in twin.layers[a + 1:b])


def ink_of(x, mean, std):
    """(1, 1, 28, 28) bool: the pixels of the scaled input x that are ink (INK_LEVEL of 255 or more)."""
    return (x * std + mean) * 255 >= INK_LEVEL - 1e-3        # the scaling undone (float32 rounding)


def ink_under_conv(twin, k, ink):
    """(H_out, W_out) bool: the outputs of conv layer k whose filter centre lies on an ink pixel.
    The layers before it carry the ink along: a pool's window is ink if one of its four is."""
    for layer in twin.layers[:k]:
        if layer.kind == "pool":
            ink = np.maximum.reduce(m.quarters(ink))
    layer, p = twin.layers[k], twin.layers[k].pad
    K = layer.K
    padded = np.pad(ink[0, 0], p)                             # the padding is no ink
    Ho, Wo = padded.shape[0] - K + 1, padded.shape[1] - K + 1
    return padded[K // 2:K // 2 + Ho, K // 2:K // 2 + Wo]


def trace_lines(net, x, y, index=0, classes=m.DATASETS["mnist"].classes):
    """The trace of one image x (1, 1, 28, 28), already scaled by to_input, label y, as lines."""
    twin = chapter_copy(net)
    names = names_of(twin)
    r = walk(twin, x, y)
    layers, outs, dins = twin.layers, r["outs"], r["dins"]
    blank, full = (0 - net.mean) / net.std, (1 - net.mean) / net.std
    title = f"Trace of test image {index} (label {classes[y]}) through"
    net_flag = f"--net \"{net.spec}\""
    lines = ([f"{title} {net_flag}"] if len(title) + 1 + len(net_flag) <= WIDTH else [title, f"  {net_flag}"])
    lines += ["One training step on a batch of just this image: forward, then backward.  Every number",
              "below is the program's own, read from the layers' outputs, caches and gradients.",
              f"{fx(blank)} is a blank pixel after the input scaling: (0 - {net.mean:.4f}) / {net.std:.4f}; "
              f"full ink (255) is {fx(full)}."]
    kinds = {layer.kind for layer in layers}
    if kinds & {"bn", "dropout"}:
        does = (["batch norm normalises with this image's own mean and variance"] if "bn" in kinds else []) \
            + (["dropout drops values at random"] if "dropout" in kinds else [])
        lines += wrap(f"Training mode, as in a training step: {', and '.join(does)}. Evaluation differs ("
                      + ", ".join((["running statistics"] if "bn" in kinds else [])
                                  + (["no dropout"] if "dropout" in kinds else []))
                      + "): the line after the softmax says what it predicts.")

    lines += ["", "Forward: the shape after every layer",
              f"  {'input':18s} {str(tuple(x.shape))}"]
    for k, (token, layer) in enumerate(zip(twin.tokens, layers)):
        label = f"{token} ({names[k]})" if names[k] else token
        lines.append(f"  {label:18s} {str(outs[k].shape)}")

    conv = first(twin, "conv")
    f = i = j = None
    if conv is None:
        lines += ["", "(no conv layer in this network: nothing to show for a convolution)"]
    else:
        on_ink = ink_under_conv(twin, conv, ink_of(x, net.mean, net.std))
        f, i, j = chosen_output(r["outs"][conv][0], r["douts"][conv][0], on_ink)
        lines += conv_lines(twin, r, conv, names[conv], (f, i, j), bool(on_ink[i, j]))

    pool = first(twin, "pool")
    if pool is not None:
        lines += pool_lines(twin, r, pool, conv, (f, i, j))

    bn = first(twin, "bn")
    if bn is not None:
        lines += bn_lines(net, twin, r, bn, names[bn], conv, (f, i, j))

    lines += softmax_lines(net, x, y, r, classes)

    lines += ["", "Backward: the gradient of the loss w.r.t. each layer's input, from the top down"]
    for k in reversed(range(len(layers))):
        label = f"{twin.tokens[k]} ({names[k]})" if names[k] else twin.tokens[k]
        lines.append(f"  {label:18s} {str(dins[k].shape)}")

    if conv is not None:
        lines += weight_gradient_lines(twin, r, conv, names[conv], (f, i, j))
    return lines


def chosen_output(out, g, on_ink):
    """(filter, row, column) of the conv output to show: among the outputs on the stroke
    (on_ink (H_out, W_out); all of them if the image has no ink), the one with the largest
    gradient, an output that mattered for the loss (the largest output if no gradient
    reached them)."""
    where = np.broadcast_to(on_ink if on_ink.any() else True, out.shape)
    a = np.abs(g) if np.any(g[where]) else out
    a = np.where(where, a, -np.inf)
    return tuple(int(v) for v in np.unravel_index(np.argmax(a), a.shape))


def conv_lines(twin, r, k, name, chosen, on_ink):
    """The first conv: one KxK input patch, the filter, their products, the sum plus the bias."""
    layer, out = twin.layers[k], r["outs"][k][0]             # (F, Ho, Wo)
    F, Ho, Wo = out.shape
    K, pad = layer.K, layer.pad
    f, i, j = chosen
    # im2col's column for output pixel (i, j) of the one image: the KxK patch it multiplied
    # (rows ki*K + kj of channel 0, the only channel of the first conv), read from the cache
    patch = r["caches"][k]["cols"][:K * K, i * Wo + j].reshape(K, K)
    w = layer.params["weight"][f, 0]
    b = layer.params["bias"][f]
    products = patch * w
    rows, cols = f"{i - pad}-{i - pad + K - 1}", f"{j - pad}-{j - pad + K - 1}"
    where = f"input rows {rows}, columns {cols}"
    if pad:       # padded after the scaling: with 0, which is not a blank pixel's value
        where += f"; padded with {pad} pixel{'s' if pad > 1 else ''} of 0, not the blank pixel's value"
    why = ("on the stroke: the pixel under the filter's centre is ink; its gradient is the largest there"
           if on_ink else "the image has no ink: of all the outputs, its gradient is the largest")
    return ["", f"Convolution, {name} filter {f}: output at row {i}, column {j}",
            f"  ({why})",
            f"  out = bias + sum over the {K}x{K} positions of patch * filter",
            f"  patch ({where}):", *grid(patch),
            f"  filter {name}.weight[{f}, 0]:", *grid(w),
            "  products, patch * filter:", *grid(products),
            f"  sum of products {fx(products.sum())} + bias {fx(b)} = {fx(products.sum() + b)}",
            f"  the program's {name} output [0, {f}, {i}, {j}] = {fx(out[f, i, j])}"]


def pool_lines(twin, r, k, conv, chosen):
    """The first max-pool: one window, which of its four positions won, where the gradient went."""
    a, out, dout, da = r["ins"][k][0], r["outs"][k][0], r["douts"][k][0], r["dins"][k][0]
    C, Hp, Wp = out.shape
    f, i, j = chosen
    if (conv is not None and conv < k and only_elementwise_between(twin, conv, k)
            and i // 2 < Hp and j // 2 < Wp):
        c, p, q = f, i // 2, j // 2                       # the window holding the conv output shown
        why = "the window holding the conv output above"
    else:
        c, p, q = np.unravel_index(np.argmax(np.abs(dout)), dout.shape)
        c, p, q = int(c), int(p), int(q)
        why = "the window whose gradient is the largest"
    window = a[c, 2 * p:2 * p + 2, 2 * q:2 * q + 2]
    right_top, right_bottom, bottom = (won[0, c, p, q] for won in r["caches"][k]["won"])
    # the tournament the layer ran: top pair, bottom pair, then the two winners
    winner = 2 * int(bottom) + int(right_bottom if bottom else right_top)
    before = f"the output of {twin.tokens[k - 1]}" if k else "the image itself"
    return ["", f"Max-pool (2x2, stride 2), map {c}, window at rows {2 * p}-{2 * p + 1}, columns "
                f"{2 * q}-{2 * q + 1} of its input:",
            f"  (its input is {before}; {why})",
            "  the four values (top-left, top-right / bottom-left, bottom-right):", *grid(window),
            f"  the max is {CORNERS[winner]}: {fx(window.flat[winner])}" +
            ("  (a tie: the first in reading order wins)" if np.sum(window == window.max()) > 1 else ""),
            f"  the program's pool output [0, {c}, {p}, {q}] = {fx(out[c, p, q])}",
            f"  backward: the gradient at that output, {gx(dout[c, p, q])}, goes to the winner only;",
            "  the other three get 0 (the program's gradient for the four positions):",
            *grid(da[c, 2 * p:2 * p + 2, 2 * q:2 * q + 2], gx)]


def bn_lines(net, twin, r, k, name, conv, chosen):
    """The first batch norm: one channel's batch mean and variance, one normalised value."""
    layer, x, out = twin.layers[k], r["ins"][k], r["outs"][k]
    cache = r["caches"][k]
    inv_std, M, axes = cache["inv_std"], cache["M"], cache["axes"]
    f, i, j = chosen
    if x.ndim == 4:
        if conv is not None and conv < k and only_elementwise_between(twin, conv, k) and f is not None:
            c, pi, pj = f, i, j                           # the conv output shown above
        else:
            c = 0
            pi, pj = (int(v) for v in np.unravel_index(np.argmax(np.abs(x[0, 0])), x.shape[2:]))
        at = (0, c, pi, pj)
        what = f"the {M} values of map {c} (its {x.shape[2]}x{x.shape[3]} positions in this one image)"
    else:
        c, at = 0, (0, 0)
        what = f"the {M} value of feature {c} in this batch of one"
    spot = "[" + ", ".join(str(v) for v in at) + "]"
    # the layer's own expressions (BatchNorm.forward) on its input; xhat from its cache
    mean, var = x.mean(axis=axes)[c], x.var(axis=axes)[c]
    value, xhat = x[at], cache["xhat"][at]
    gamma, beta = layer.params["weight"][c], layer.params["bias"][c]
    lines = ["", f"Batch norm ({name}), channel {c}, over {what}:",
             f"  batch mean mu = {fx(mean)}, batch variance var = {fx(var)} (divided by M = {M}), "
             f"eps = {layer.eps:g}",
             f"  1 / sqrt(var + eps) = {fx(inv_std[c])}",
             f"  the value x{spot} = {fx(value)};  x - mu = {fx(value - mean)}",
             f"  xhat = (x - mu) / sqrt(var + eps) = {fx(xhat)}",
             f"  out = gamma * xhat + beta = {fx(gamma)} * {fx(xhat)} + {fx(beta)} "
             f"= {fx(gamma * xhat + beta)}",
             f"  the program's {name} output {spot} = {fx(out[at])}"]
    if M == 1:
        lines.append("  (one value per feature in a batch of one: x - mu is 0, so xhat is 0 and out is beta)")
    lines += ["  evaluation would use the running statistics instead:",
              f"  running_mean = {fx(net.state[name + '.running_mean'][c])}, "
              f"running_var = {fx(net.state[name + '.running_var'][c])}"]
    return lines


def softmax_lines(net, x, y, r, classes):
    """The output: logits, softmax, the loss and its gradient p - onehot(y)."""
    z, dz = r["logits"], r["dlogits"]
    p = np.exp(m.log_softmax(z[None]))[0]                 # the program's softmax
    w = max(5, max(len(name) for name in classes))
    lines = ["", f"Output: softmax cross-entropy against the label {classes[y]}",
             f"  p = exp(z - max) / sum of exp(z - max); the sum is {fx(np.exp(z - z.max()).sum())}",
             "  dL/dz = p - onehot(y), divided by the batch size 1",
             f"  {'class':>{w}s} {'logit z':>10s} {'z - max':>10s} {'p':>10s} {'dL/dz':>11s}"]
    lines += [f"  {classes[c]:>{w}s} {fx(z[c]):>10s} {fx(z[c] - z.max()):>10s} {fx(p[c]):>10s} "
              f"{gx(dz[c]):>11s}" for c in range(len(z))]
    loss = r["loss"]
    lines += [f"  loss = -ln p[{y}] = {fx(loss) if loss >= 0.01 else f'{loss:.4e}'}  "
              "(ln 10 = 2.303 for a guess at random)",
              f"  the network says {classes[int(np.argmax(z))]} (p = {fx(p.max())})"]
    if any(layer.kind in ("bn", "dropout") for layer in net.layers):
        # the network itself: the copy's batch norm statistics moved with the training step
        pe = np.exp(m.log_softmax(net.forward(x, train=False)))[0]
        lines.append(f"  in evaluation mode it says {classes[int(np.argmax(pe))]} (p = {fx(pe.max())}), "
                     f"p[{y}] = {fx(pe[y])}")
    return lines


def weight_gradient_lines(twin, r, k, name, chosen):
    """The first conv's weight gradient for the filter shown: the sum of patch * output gradient."""
    layer, cols = twin.layers[k], r["caches"][k]["cols"]
    f, i, j = chosen
    g = r["douts"][k][0, f]                                # (Ho, Wo): dL/d(this filter's output)
    Ho, Wo = g.shape
    K = layer.K
    dw, db = r["grads"][f"{name}.weight"][f, 0], r["grads"][f"{name}.bias"][f]
    nonzero = [(int(a), int(b)) for a, b in zip(*np.nonzero(g))]
    patch = cols[:K * K, i * Wo + j].reshape(K, K)
    ki, kj = np.unravel_index(np.argmax(np.abs(dw)), dw.shape)
    ki, kj = int(ki), int(kj)
    row = cols[ki * K + kj]                                # the pixel weight (ki, kj) meets at every position
    terms = [(a, b, g[a, b], row[a * Wo + b]) for a, b in nonzero]
    lines = ["", f"Weight gradient of {name}, filter {f}: dW = sum over the {Ho}x{Wo} output positions of",
             "  (the input patch there) * g, with g = dL/d(output) there; db = sum of g",
             f"  g is nonzero at {len(nonzero)} of the {Ho * Wo} positions"
             + ("" if len(nonzero) == Ho * Wo else " (elsewhere: ReLU off, or not its pool window's max)"),
             f"  the patch shown above, at row {i}, column {j}, has g = {gx(g[i, j])}; its term g * patch is:",
             *grid(g[i, j] * patch, gx),
             f"  weight [{ki}, {kj}] (the largest of the gradient) meets input pixel "
             f"(row + {ki}, column + {kj}):",
             f"  dW[{ki}, {kj}] = sum of g * pixel, term by term (row, column: g * pixel):"]
    shown = terms if len(terms) <= ALL_TERMS else sorted(terms, key=lambda t: -abs(t[2] * t[3]))[:TOP_TERMS]
    cells = [f"({a},{b}): {gx(gv)} * {fx(xv)}" for a, b, gv, xv in shown]
    lines += ["    " + ";  ".join(cells[s:s + 3]) for s in range(0, len(cells), 3)]
    if len(shown) < len(terms):
        rest = sum(gv * xv for _, _, gv, xv in terms) - sum(gv * xv for _, _, gv, xv in shown)
        lines.append(f"    ... and the other {len(terms) - len(shown)} terms, which add up to {gx(rest)}")
    lines += [f"  the program's dW for filter {f} ({name}'s backward: dout @ cols.T):", *grid(dw, gx),
              f"  and db = sum of g = {gx(db)}"]
    if k + 1 < len(twin.layers) and twin.layers[k + 1].kind == "bn":
        lines.append("  (0 but for rounding: the batch norm right after the conv subtracts the mean,")
        lines.append("  which cancels any bias)")
    return lines


def trace(net, x, y, index=0, out=print, classes=m.DATASETS["mnist"].classes):
    """--trace: print the trace of one image (see trace_lines)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        for line in trace_lines(net, x, int(y), index, classes):
            out(line)
