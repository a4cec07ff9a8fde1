"""Watch the network think: one image's maps after every layer (--show-maps I), and why it
chose a class (--why I), in the terminal and, with --plot, as one figure in a PNG.

    python3 mnist_net.py --load-model m.npz --show-maps 0 --why 0 --plot inside.png
    python3 mnist_net.py --load-model m.npz --predict my_seven.png --why 0

Both use the chapter's layers (mnist_net.py), walked one by one on a copy of the network made of
them, whatever layers the run trained with: the same parameters, every layer's output a plain
(N, C, H, W) map or (N, D) vector, in evaluation mode (batch norm's running statistics, dropout
passing everything).  The saliency is the gradient of the chosen class's score (its logit) with
respect to the input pixels, from the layers' own backward passes.

The terminal shows a few maps of each layer (one row of them, the same maps from a conv down to
the next one, so a map can be followed through its batch norm, ReLU and pool); --plot draws them all.
"""
import os

import numpy as np

import mnist_net
from tools import own_digits
from tools.model_files import chapter_copy
from tools.reports import SHADES, ascii_digit

WIDTH = 100            # terminal columns every drawing fits in
TOP_UNITS = 8          # a dense layer's strongest units listed
INK_LEVEL = 128        # a pixel is ink when at least half bright (128 of 255): strokes, not their soft edges
INK_REACH = 2          # "near the ink": an ink pixel or a pixel at most 2 rows and 2 columns from one


# --- computing ------------------------------------------------------------------------------
def layer_outputs(twin, x):
    """x (1, 1, 28, 28) -> [(token, layer, output of that layer for the image)], in list order,
    evaluation mode; the last output is the logits (10,)."""
    outputs = []
    for token, layer in zip(twin.tokens, twin.layers):
        x = layer.forward(x, train=False)
        outputs.append((token, layer, x[0]))                 # the chapter's layers hand out fresh arrays
    return outputs


def saliency(twin, x, classes):
    """d logit[classes[n]] / d x[n] for each image n: x (N, 1, 28, 28), classes (N,) -> (N, 28, 28).

    1) forward in evaluation mode (batch norm on its running statistics, dropout off);
    2) seed the backward with dlogits = onehot(class): the gradient of that one score;
    3) the network's own backward, asked for the input gradient the first conv can compute.
       The parameter gradients it leaves in twin.grad are not used.
    """
    logits = twin.forward(x, train=False)                                   # 1)
    dout = np.zeros_like(logits)
    dout[np.arange(len(x)), classes] = 1                                    # 2)
    return np.array(twin.backward(dout, input_grad=True)[:, 0])             # 3)


def near_ink(image, level=INK_LEVEL, reach=INK_REACH):
    """(28, 28) bool: the ink (pixels >= level) grown by `reach` pixels in every direction,
    diagonals included (a (2*reach + 1)-square around every ink pixel)."""
    ink = np.asarray(image) >= level
    h, w = ink.shape
    near = ink.copy()
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            near[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                ink[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return near


def share_near_ink(grad, image):
    """The share of the absolute gradient mass sum |grad| that lies on or near the ink."""
    a = np.abs(grad)
    return float(a[near_ink(image)].sum() / max(a.sum(), 1e-30))


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# --- the terminal ---------------------------------------------------------------------------
def shade(a, lo, hi):
    """Values -> SHADES indices: lo -> ' ' (0), hi -> '@' (9), linear in between."""
    if hi <= lo:
        return np.zeros(a.shape, int)
    return np.minimum((len(SHADES) * (a - lo) / (hi - lo)).astype(int), len(SHADES) - 1)


def map_lines(a):
    """One map (H, W) as lines of shades, scaled to its own lowest and highest value.

    A character is about twice as tall as it is wide, so the picture stays square: maps up
    to 8 pixels wide get two characters per pixel and a line per row; wider maps get one
    character per pixel and a line per two rows (their mean).
    """
    a = np.asarray(a, np.float64)
    if a.shape[1] <= 8:
        levels = shade(a, a.min(), a.max())
        return ["".join(SHADES[v] * 2 for v in row) for row in levels]
    if len(a) % 2:
        a = np.vstack([a, a[-1:]])                              # an odd last row pairs with itself
    pairs = (a[0::2] + a[1::2]) / 2
    levels = shade(pairs, pairs.min(), pairs.max())
    return ["".join(SHADES[v] for v in row) for row in levels]


def cell_width(cells):
    """The columns one cell of grid takes: its widest header or line, and 2 of space."""
    return max(max(len(h), max(len(line) for line in lines)) for h, lines in cells) + 2


def grid(cells, width=WIDTH, indent=2):
    """cells [(header, lines)] -> lines: as many cells side by side as fit in `width` columns."""
    cell = cell_width(cells)
    per_row = max(1, (width - indent) // cell)
    out = []
    for start in range(0, len(cells), per_row):
        row = cells[start:start + per_row]
        out.append((" " * indent + "".join(h.ljust(cell) for h, _ in row)).rstrip())
        for i in range(max(len(lines) for _, lines in row)):
            out.append((" " * indent + "".join((lines[i] if i < len(lines) else "").ljust(cell)
                                               for _, lines in row)).rstrip())
    return out


def map_cells(out, channels):
    """[(header, lines)]: the maps `channels` of out (C, H, W), each numbered, with its range."""
    return [(f"{c} {number(out[c].min())}..{number(out[c].max())}" if out[c].max() > out[c].min()
             else f"{c} all {number(out[c].max())}", map_lines(out[c])) for c in channels]


def map_stretches(outputs):
    """[[indices in outputs]]: the map outputs grouped from each conv down to the next (its batch
    norm, ReLU, pool and dropout keep the channels, so a map can be followed through them)."""
    stretches, current = [], []
    for i, (_, layer, out) in enumerate(outputs):
        if out.ndim != 3 or (layer.kind == "conv" and current):
            if current:
                stretches.append(current)
            current = []
        if out.ndim == 3:
            current.append(i)
    if current:
        stretches.append(current)
    return stretches


def maps_shown(outputs, width=WIDTH, indent=2):
    """{index in outputs: the channels the terminal draws} for every map output.

    One row of maps per layer, and the same maps from a conv down to the next conv (through
    its batch norm, ReLU, pool and dropout, which keep the channels), so a map can be followed:
    the ones most active (largest mean |value|) in the last map of that stretch, the one the
    next layer reads; in channel order.
    """
    stretches = map_stretches(outputs)
    shown = {}
    for stretch in stretches:
        C = len(outputs[stretch[0]][2])
        fits = min(max(1, (width - indent) // cell_width(map_cells(outputs[i][2], range(C))))
                   for i in stretch)
        activity = np.abs(outputs[stretch[-1]][2].astype(np.float64)).mean(axis=(1, 2))
        chosen = sorted(int(c) for c in np.argsort(-activity, kind="stable")[:fits])
        shown.update({i: chosen for i in stretch})
    return shown


def number(v):
    """A short signed number for a header: 2.31, -0.41, 0."""
    return f"{v:.2g}" if abs(v) < 0.1 and v != 0 else f"{v:.2f}".rstrip("0").rstrip(".")


def bar(v, scale, length=40):
    """'#' for a positive value, '-' for a negative one, as long as |v| / scale of `length`."""
    return ("#" if v > 0 else "-") * int(round(length * abs(v) / scale)) if scale > 0 else ""


def layer_label(twin, token, layer, shape):
    """'conv8 (conv1) -> (8, 26, 26)': the token, its parameter name, the shape after it."""
    names = {id(l): prefix for prefix, l in twin.named}
    return f"{token}" + (f" ({names[id(layer)]})" if id(layer) in names else "") + f" -> {shape}"


def dense_lines(values, last, classes):
    """A (D,) output: the last layer's scores, all classes highest first with softmax
    probabilities; any other, its TOP_UNITS strongest (largest) units."""
    if last:
        p = softmax(values.astype(np.float64))
        order = np.argsort(-values)
        scale = float(np.abs(values).max())
        width = max(len(c) for c in classes)
        return [f"    {classes[k]:>{width}}  {values[k]:7.2f}  p={p[k]:.2f}  {bar(values[k], scale)}"
                for k in order]
    order = np.argsort(-values, kind="stable")[:TOP_UNITS]
    scale = float(np.abs(values[order]).max())
    return [f"    unit {k:4d}  {values[k]:7.2f}  {bar(values[k], scale)}" for k in order]


def show_maps_lines(twin, outputs, image, title, classes, plot=None):
    """--show-maps: lines drawing the input and every layer's output for one image (a row of
    maps per layer, see maps_shown; plot: the PNG that draws them all, if --plot names one)."""
    logits = outputs[-1][2]
    p = softmax(logits.astype(np.float64))
    best = int(np.argmax(logits))
    shown = maps_shown(outputs)
    lines = [f"maps of {title}: predicted {classes[best]} (p={p[best]:.2f})",
             "each map is scaled to its own range: ' ' its lowest value, '@' its highest "
             "(both shown above it)"]
    if any(len(channels) < len(outputs[i][2]) for i, channels in shown.items()):
        lines += ["a row of maps per layer: the most active, the same ones from a conv down to the next;",
                  f"--plot {plot or 'maps.png'} draws every map"]
    lines += ["", "input (1, 28, 28)"]
    lines += [("  " + row).rstrip() for row in ascii_digit(image)]
    for i, (token, layer, out) in enumerate(outputs):
        lines.append("")
        label = layer_label(twin, token, layer, out.shape)
        last = i == len(outputs) - 1
        if token == "flatten":
            lines.append(f"{label}: the maps above in one row, in (channel, row, column) order")
        elif out.ndim == 3:
            channels = shown[i]
            lines.append(f"{label}: {len(out)} maps"
                         + ("" if len(channels) == len(out) else f", {len(channels)} drawn")
                         + ("; in evaluation dropout passes everything" if layer.kind == "dropout" else ""))
            lines += grid(map_cells(out, channels))
        elif last:
            lines.append(f"{label}: the scores (logits), highest first, with softmax probabilities")
            lines += dense_lines(out, True, classes)
        else:
            lines.append(f"{label}: the {min(TOP_UNITS, len(out))} strongest of {len(out)} units "
                         f"({int((out > 0).sum())} above 0)")
            lines += dense_lines(out, False, classes)
    return lines


def why_lines(image, title, grads, chosen, p, shares, classes):
    """--why: the digit beside the saliency of the predicted class and the runner-up."""
    first, second = chosen
    cells = [("input", map_lines(image))]
    for k, g, share in zip(chosen, grads, shares):
        cells.append((f"{classes[k]}: {100 * share:.0f}% near ink", map_lines(np.abs(g))))
    return [f"why {title}? predicted {classes[first]} (p={p[first]:.2f}), runner-up {classes[second]} "
            f"(p={p[second]:.2f})",
            "saliency: |d score / d pixel| from the network's backward pass, each scaled to its largest;",
            f"'near ink': on or within {INK_REACH} pixels of a pixel of {INK_LEVEL} or more "
            f"({100 * near_ink(image).mean():.0f}% of this image)"] + grid(cells, indent=2)


# --- the PNG --------------------------------------------------------------------------------
def plot(path, maps, why, write_atomically, out=print):
    """One figure: the saliency (why) on top, then the input and every layer's output (maps);
    either may be None.  Returns False (after one line saying so) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out(f"--plot {path}: skipped, matplotlib is not installed (pip install matplotlib)")
        return False
    COLS = 16                                             # maps per row
    parts = []                                            # (height in inches, draw(subfigure))
    if why is not None:
        parts.append((2.9, lambda sf: draw_why(sf, *why)))
    if maps is not None:
        twin, outputs, image, title, classes = maps
        text_height = 0.6 + 0.14 * len(mnist_net.describe(twin))     # the layer list beside the input
        parts.append((max(2.0, text_height),
                      lambda sf: draw_input(sf, twin, image, title, outputs[-1][2], classes)))
        for i, (token, layer, o) in enumerate(outputs):
            label = layer_label(twin, token, layer, o.shape)
            if token == "flatten":
                continue
            if o.ndim == 3:
                rows = -(-len(o) // COLS)
                parts.append((0.35 + 0.95 * rows, lambda sf, o=o, label=label, kind=layer.kind:
                              draw_maps(sf, o, label, COLS, kind)))
            elif i < len(outputs) - 1:
                parts.append((1.7, lambda sf, o=o, label=label: draw_units(sf, o, label)))
            else:
                parts.append((1.9, lambda sf, o=o, label=label: draw_scores(sf, o, label, classes)))
    fig = plt.figure(figsize=(14, sum(h for h, _ in parts)), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(parts), 1, height_ratios=[h for h, _ in parts]))
    for sf, (_, draw) in zip(subfigs, parts):
        draw(sf)
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def draw_why(sf, image, title, grads, chosen, p, shares, classes):
    axes = sf.subplots(1, 4, width_ratios=[1, 1, 1, 1.6])
    axes[0].imshow(image, cmap="gray_r")
    axes[0].set_title(title, fontsize=10)
    ink = near_ink(image, reach=0)
    for ax, k, g, share in zip(axes[1:3], chosen, grads, shares):
        scale = float(np.abs(g).max()) or 1.0
        ax.imshow(g, cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.contour(ink, levels=[0.5], colors="k", linewidths=0.8)
        ax.set_title(f"why {classes[k]} (p={p[k]:.2f})\n{100 * share:.0f}% of |gradient| near the ink",
                     fontsize=10)
    for ax in axes[:3]:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[3].axis("off")
    axes[3].text(0, 0.5, "saliency: the gradient of the class's score\n(its logit) with respect to each "
                 "pixel,\nfrom the network's own backward pass\n\nred: more ink here raises the score\n"
                 "blue: more ink here lowers it\nblack line: the ink, pixels of 128 or more\n"
                 f"'near': within {INK_REACH} pixels of the ink", fontsize=10, va="center")
    sf.suptitle("Why this class?", fontsize=12, fontweight="bold")


def draw_input(sf, twin, image, title, logits, classes):
    ax_image, ax_text = sf.subplots(1, 2, width_ratios=[1, 5])
    ax_image.imshow(image, cmap="gray_r")
    ax_image.set_xticks([])
    ax_image.set_yticks([])
    ax_image.set_title("input (1, 28, 28)", fontsize=9)
    ax_text.axis("off")
    ax_text.text(0, 0.5, "\n".join(mnist_net.describe(twin)), family="monospace", fontsize=8, va="center")
    p = softmax(logits.astype(np.float64))
    best = int(np.argmax(p))
    sf.suptitle(f"Feature maps of {title}: predicted {classes[best]} (p={p[best]:.2f}); "
                "each map scaled on its own", fontsize=12, fontweight="bold")


def draw_scores(sf, o, label, classes):
    ax = sf.subplots()
    p = softmax(o.astype(np.float64))
    best = int(np.argmax(o))
    ax.bar(range(len(o)), o, color=["tab:red" if k == best else "tab:gray" for k in range(len(o))])
    for k in range(len(o)):
        ax.annotate(f"p={p[k]:.2f}", (k, max(o[k], 0)), ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xticks(range(len(o)), classes, fontsize=9)
    ax.set_ylabel("score (logit)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.margins(y=0.2)
    sf.suptitle(f"{label}: the scores, and their softmax probabilities", fontsize=10, x=0.01, ha="left")


def draw_maps(sf, o, label, cols, kind):
    rows = -(-len(o) // cols)
    axes = np.atleast_1d(sf.subplots(rows, cols)).reshape(-1)
    for c, ax in enumerate(axes):
        ax.axis("off")
        if c < len(o):
            m = o[c]
            if m.min() < 0:                                   # signed: white is 0, red +, blue -
                s = float(np.abs(m).max())
                ax.imshow(m, cmap="RdBu_r", vmin=-s, vmax=s)
            else:
                ax.imshow(m, cmap="gray_r", vmin=0, vmax=float(m.max()) or 1.0)
            ax.set_title(str(c), fontsize=7, pad=1)
    note = ("; red +, blue -, white 0" if o.min() < 0 else "; dark = high, white 0") + \
           ("; dropout passes everything in evaluation" if kind == "dropout" else "")
    sf.suptitle(label + note, fontsize=10, x=0.01, ha="left")


def draw_units(sf, o, label):
    ax = sf.subplots()
    top = np.argsort(-o, kind="stable")[:5]
    colors = np.where(o > 0, "tab:blue", "tab:gray")
    ax.bar(range(len(o)), o, color=colors, width=1.0)
    for k in top:
        ax.annotate(str(k), (k, o[k]), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(-1, len(o))
    ax.set_xlabel("unit", fontsize=8)
    ax.tick_params(labelsize=7)
    sf.suptitle(f"{label}: every unit; the 5 strongest numbered ({int((o > 0).sum())} of {len(o)} above 0)",
                fontsize=10, x=0.01, ha="left")


# --- from the command line ------------------------------------------------------------------
def show(args, net, dataset, to_input, write_atomically, out=print, test=None):
    """--show-maps and --why for run(): on test image I (test = (images, labels)), or with
    --predict on picture I of the list.  Returns the exit code (1: the picture is unreadable)."""
    classes = dataset.classes
    twin = chapter_copy(net)
    maps = why = None
    code = 0
    for flag, i in (("--show-maps", args.show_maps), ("--why", args.why)):
        if i is None:
            continue
        if test is not None:
            image, title = test[0][i], f"test image {i} (labelled {classes[test[1][i]]})"
        else:
            prepare = own_digits.fashion_like if dataset.key == "fashion" else own_digits.mnist_like
            try:
                image = prepare(own_digits.read_image(args.predict[i]))
                title = os.path.basename(args.predict[i])
            except own_digits.ImageError as e:
                out(f"{flag} {i}: {args.predict[i]} cannot be shown: {e}")
                code = 1
                continue
        x = to_input(image[None])
        if flag == "--show-maps":
            outputs = layer_outputs(twin, x)
            for line in show_maps_lines(twin, outputs, image, title, classes, args.plot):
                out(line)
            maps = (twin, outputs, image, title, classes)
        else:
            logits = twin.forward(x, train=False)[0].astype(np.float64)
            p = softmax(logits)
            chosen = [int(k) for k in np.argsort(-logits)[:2]]
            grads = saliency(twin, np.repeat(x, 2, axis=0), np.array(chosen))
            shares = [share_near_ink(g, image) for g in grads]
            for line in why_lines(image, title, grads, chosen, p, shares, classes):
                out(line)
            why = (image, title, grads, chosen, p, shares, classes)
        out("")
    if args.plot and (maps or why) and plot(args.plot, maps, why, write_atomically, out):
        drawn = " and ".join(name for name, part in (("saliency", why), ("maps", maps)) if part)
        out(f"Wrote the {drawn} to {args.plot}")
    return code
