"""Why is my network not learning?  python3 mnist_net.py --diagnose [--net ... --lr ... ...]

Trains a fresh network with the run's recipe (--net, --optimizer, --lr, --sgd-lr, --momentum,
--weight-decay, --batch-size, --schedule, --seed, --limit: the same initial weights and the same
first batches as the real run) for a few hundred steps, then reports in plain words, with numbers,
the checks CS231n's workflow asks for:
1) the first loss against ln(10) = 2.303, what a network that guesses at random scores;
2) per layer, the mean and spread (standard deviation) of its outputs, and for each ReLU the
   share of its units never active on 512 training images (a unit: one map of a conv, one
   feature of a dense layer; a unit that is never active passes no gradient, so it stays dead);
3) per parameter, the size (root mean square) of its gradient and the ratio of the size of one
   update to the size of the weights (about 1e-3 is healthy for SGD; Adam's steps, about the
   learning rate per weight, give 1e-3 to 1e-1 on these small nets);
4) whether the same recipe drives the loss on 100 examples to near zero (a network that cannot
   overfit 100 examples has a bug or a learning rate far off);
5) one verdict per problem found, each with what to try.
It stops early, and reports, when the loss becomes NaN or infinite.

It trains the chapter's own network (mnist_net.Network), whose layers it walks one by one, with
the data set's input scaling; the fast path computes the same numbers (tests/test_fast_path.py).
"""
import math
import textwrap

import numpy as np

import mnist_net as m

STEPS = 300                 # training steps of the diagnosis
PROBE = 512                 # training images the activations are measured on
OVERFIT_EXAMPLES = 100
OVERFIT_STEPS = 200         # full-batch steps on the 100 examples, at most
NEAR_ZERO = 0.05            # an overfit loss below this is near zero
LN10 = math.log(10)

# The lines between healthy and not, measured on MNIST and the synthetic test digits (README):
INITIAL_LOSS_OFF = 0.7      # a first loss further than this from ln 10: the initial weights are off
DEAD_SHARE = 0.5            # a ReLU with at least this share of its units never active
LEARNED_SHARE = 0.1         # the loss must fall by at least this share of the first loss
HIGH_RATIO = 1.0            # steps as large as the weights themselves (median of the first 10 steps)
GREW = 10                   # weights 10 times their initial size after a few hundred steps
PEAKED = 5                  # a loss 5 times the first one on the way
LOW_RATIO = 1e-5            # the largest weight's update/weight ratio below this: steps too small
VANISHED = 1e-4             # a weight whose gradient is 1e-4 of the largest weight gradient (both
                            # relative to their weights' sizes)
EXPLODED = 1000             # a gradient 1000 times its size in the first step
WIDTH = 100                 # columns every printed line fits in


def wrap(text, indent="", first=None):
    """A paragraph as lines of at most WIDTH columns: `first` starts the first line (`indent` if
    None), `indent` the others; flags and numbers are never split."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent if first is None else first,
                         subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


class Recorder:
    """Per-step numbers: the loss, and per parameter the gradient size and the update/weight ratio."""

    def __init__(self, net):
        self.names = list(net.params)
        self.slices, start = {}, 0
        for name, p in net.params.items():        # the flat vector holds them in this order
            self.slices[name] = slice(start, start + p.size)
            start += p.size
        self.losses, self.grad_rms, self.ratio = [], {n: [] for n in self.names}, {n: [] for n in self.names}

    def step(self, net, loss, update):
        self.losses.append(loss)
        for name, s in self.slices.items():
            g, u, w = net.grad[s], update[s], net.flat[s]
            self.grad_rms[name].append(rms(g))
            w_size = rms(w)
            self.ratio[name].append(rms(u) / w_size if w_size > 0 else math.nan)


def rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) if a.size else 0.0


def batches(rng, n, batch_size):
    """Index batches as train_epoch draws them: a fresh permutation per epoch, in order."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def train_steps(net, opt, train_x, train_y, batch_size, rng, steps, total_steps, schedule, rec):
    """The run's training loop (train_epoch's steps), recording every step; stops at a
    non-finite loss.  Returns the step it stopped at with a non-finite loss, or None."""
    draw = batches(rng, len(train_x), batch_size)
    for step in range(steps):
        idx = next(draw)
        x = m.to_input(train_x[idx], net.mean, net.std).astype(net.flat.dtype, copy=False)
        loss, _ = m.loss_and_grads(net, x, train_y[idx])
        if not math.isfinite(loss):
            rec.losses.append(loss)
            return step + 1
        scale = m.cosine_scale(step, total_steps) if schedule == "cosine" else 1.0
        update = opt.update(net.grad, scale)
        rec.step(net, loss, update)
        net.flat += update
    return None


def activation_stats(net, images, batch=128):
    """Per layer of the network (the chapter's: plain (N, C, H, W) maps in list order): (label,
    mean, std, never-active share or None, units), in training mode on the images, as the
    steps saw them.  A ReLU's unit is a map (conv) or a feature (dense).  Run last: in training
    mode batch norm's running statistics move (and dropout draws from the run's generator)."""
    n_layers = len(net.layers)
    sums, squares, counts = np.zeros(n_layers), np.zeros(n_layers), np.zeros(n_layers)
    ever_active = [None] * n_layers
    for start in range(0, len(images), batch):
        h = m.to_input(images[start:start + batch], net.mean, net.std).astype(net.flat.dtype, copy=False)
        for k, layer in enumerate(net.layers):
            h = layer.forward(h, True)
            h64 = h.astype(np.float64)
            sums[k] += h64.sum()
            squares[k] += np.square(h64).sum()
            counts[k] += h.size
            if layer.kind == "relu":
                axes = (0, 2, 3) if h.ndim == 4 else (0,)
                active = (h > 0).any(axis=axes)
                ever_active[k] = active if ever_active[k] is None else ever_active[k] | active
    prefix = {id(layer): name for name, layer in net.named}
    rows, below = [], "the input"
    for k, (token, layer) in enumerate(zip(net.tokens, net.layers)):
        if id(layer) in prefix:
            below = prefix[id(layer)]
        if layer.kind == "flatten":
            continue
        mean = sums[k] / counts[k]
        std = math.sqrt(max(squares[k] / counts[k] - mean ** 2, 0.0))
        if id(layer) in prefix:
            label = f"{token} ({prefix[id(layer)]})"
        else:
            label = f"{token} after {below}" if layer.kind == "relu" else token
        if ever_active[k] is None:
            rows.append((label, mean, std, None, None))
        else:
            units = ever_active[k].size
            rows.append((label, mean, std, 1 - ever_active[k].mean(), units))
    return rows


def overfit(args, train_x, train_y, steps, prepare=None):
    """Train a fresh network (the run's initial weights) on the first 100 examples, full batch,
    at the run's constant learning rates.  Returns (steps taken, loss in evaluation mode, accuracy)."""
    dataset = m.DATASETS[args.dataset or "mnist"]
    rng = np.random.default_rng(args.seed)
    net = m.Network(args.net, rng, mean=dataset.mean, std=dataset.std)
    if prepare:
        prepare(net)
    opt = m.make_optimizer(args.optimizer, net, args.lr, args.sgd_lr, args.momentum, args.weight_decay)
    x = m.to_input(train_x[:OVERFIT_EXAMPLES], net.mean, net.std).astype(net.flat.dtype, copy=False)
    y = train_y[:OVERFIT_EXAMPLES]
    loss = math.inf
    for step in range(1, steps + 1):
        train_loss, _ = m.loss_and_grads(net, x, y)
        if not math.isfinite(train_loss):
            return step, math.nan, 0.0
        net.flat += opt.update(net.grad)
        if step % 10 == 0 or step == steps:
            logits = net.forward(x, train=False)
            loss, _ = m.softmax_cross_entropy(logits, y)
            if not math.isfinite(loss) or loss < NEAR_ZERO / 5:
                break
    logits = net.forward(x, train=False)
    loss, _ = m.softmax_cross_entropy(logits, y)
    return step, loss, float((logits.argmax(axis=1) == y).mean())


def median(values):
    values = [v for v in values if math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


class Findings:
    """What a diagnosis measured (see measure)."""


def measure(args, data, steps, overfit_steps, prepare=None):
    """Train `steps` steps with the run's recipe, recording every step, then measure the
    activations and try to overfit 100 examples."""
    f = Findings()
    dataset = m.DATASETS[args.dataset or "mnist"]      # --diagnose trains: no model file to ask
    train_x, train_y = data[0], data[1]
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    rng = np.random.default_rng(args.seed)             # as train(): the same weights and batches
    net = f.net = m.Network(args.net, rng, mean=dataset.mean, std=dataset.std)
    if prepare:
        prepare(net)
    opt = m.make_optimizer(args.optimizer, net, args.lr, args.sgd_lr, args.momentum, args.weight_decay)
    # the run's schedule (cosine over all its epochs), stretched if the run is shorter than this
    total_steps = max(math.ceil(len(train_x) / args.batch_size) * args.epochs, steps)
    f.steps, f.rec = steps, Recorder(net)
    f.start_size = {name: rms(p) for name, p in net.params.items()}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        f.blew_up = train_steps(net, opt, train_x, train_y, args.batch_size, rng, steps, total_steps,
                                args.schedule, f.rec)
        f.done = len(f.rec.losses) - (1 if f.blew_up else 0)          # steps with a finite loss
        f.probe = min(PROBE, len(train_x))
        f.stats = activation_stats(net, train_x[:PROBE]) if np.all(np.isfinite(net.flat)) else None
        f.fit = None if f.blew_up else overfit(args, train_x, train_y, overfit_steps, prepare)
    f.first = f.rec.losses[0]
    f.tail = f.rec.losses[-min(20, f.done):] if not f.blew_up else []  # the last 20 steps
    f.end = float(np.mean(f.tail)) if f.tail else math.nan
    f.weights = [n for n in f.rec.names if n.endswith(".weight") and not n.startswith("bn")]
    return f


def report(f):
    """Sections 1) to 4) of the report, as lines of at most WIDTH columns."""
    rec, net = f.rec, f.net
    lines = ["", f"1) First loss {f.first:.3f}; a network guessing at random scores ln(10) = {LN10:.3f}."]
    if f.blew_up:
        lines += [f"   The loss became {rec.losses[-1]} at step {f.blew_up}: the diagnosis stops here.",
                  "   The last losses: " + ", ".join(f"{v:.3g}" for v in rec.losses[-6:])]
    else:
        change = f.first - f.end
        lines += wrap(f"After {f.done} steps the loss is {f.end:.3f} (mean of the last {len(f.tail)} "
                      f"steps); it {'fell' if change >= 0 else 'rose'} by {abs(change):.3f}, "
                      f"{100 * abs(change) / f.first:.0f}% of the first.", "   ")

    lines.append("")
    if f.stats is None:
        lines.append("2) Activations: not measured, the weights are no longer finite numbers.")
    else:
        lines += wrap(f"Activations after {f.done} steps, on {f.probe} training images (training mode); "
                      "a ReLU's unit is one map of a conv, one feature of a dense layer:", "   ", "2) ")
        lines.append(f"   {'layer':20s} {'mean':>9s} {'spread':>9s}   ReLU units never active")
        for label, mean, std, dead, units in f.stats:
            lines.append(f"   {label:20s} {mean:9.3g} {std:9.3g}"
                         + (f"   {round(dead * units)} of {units} ({100 * dead:.0f}%)" if dead is not None
                            else ""))

    lines.append("")
    lines += wrap(f"Parameters: their size (root mean square) now, and the median over the {f.done} "
                  "steps of their gradient's size and of update size / parameter size (about 1e-3 is "
                  "healthy for SGD; Adam's steps give 1e-3 to 1e-1 here):", "   ", "3) ")
    lines.append(f"   {'parameter':18s} {'size':>10s} {'gradient':>10s} {'update/size':>12s}")
    for name in rec.names:
        lines.append(f"   {name:18s} {rms(net.flat[rec.slices[name]]):10.3g} {median(rec.grad_rms[name]):10.3g} "
                     f"{median(rec.ratio[name]):12.2e}")

    lines.append("")
    if f.fit is None:
        lines.append(f"4) Overfitting {OVERFIT_EXAMPLES} examples: skipped, the training above blew up.")
    else:
        taken, loss, accuracy = f.fit
        lines += wrap(f"Overfitting {OVERFIT_EXAMPLES} examples (the same recipe, full batch, constant "
                      f"rates): after {taken} steps their loss is {loss:.4f} and {100 * accuracy:.0f}% are "
                      "right: " + ("near zero, as it should be." if loss < NEAR_ZERO
                                   else f"not near zero (below {NEAR_ZERO})."), "   ", "4) ")
    return lines


def rate_flags(args, factor):
    """The flags of the learning rates this optimizer uses, times factor."""
    flags = [f"--lr {args.lr * factor:g}"] if args.optimizer != "momentum" else []
    return " ".join(flags + ([f"--sgd-lr {args.sgd_lr * factor:g}"] if args.optimizer in ("dual", "momentum") else []))


def verdicts(f, args):
    """[(problem, what to try)], the learning rate first; [] when nothing is wrong."""
    rec, net, found = f.rec, f.net, []
    size_now = {n: rms(net.flat[rec.slices[n]]) for n in f.weights}

    # the learning rate: the steps overshoot, or they are too small to move anything
    early = max((median(rec.ratio[n][:10]) for n in f.weights), default=math.nan)   # the first 10 steps
    growth = max((size_now[n] / max(f.start_size[n], 1e-30) for n in f.weights), default=1.0)
    peak = max(rec.losses[:f.done], default=f.first)
    largest = max((r for r in (median(rec.ratio[n]) for n in f.weights) if math.isfinite(r)), default=math.nan)
    if f.blew_up:
        found.append(("learning rate too high", f"the loss became {rec.losses[-1]} at step {f.blew_up}: the "
                      f"steps overshoot. Try a learning rate 10 times smaller ({rate_flags(args, 0.1)})"))
    elif early > HIGH_RATIO or growth > GREW or peak > PEAKED * f.first:
        found.append(("learning rate too high",
                      f"in the first 10 steps one step changed the weights by up to {early:.2g} times their "
                      f"size, the weights grew up to {growth:.3g}-fold and the loss peaked at {peak:.3g} "
                      f"(first {f.first:.3f}): the steps overshoot. Try a learning rate 10 times smaller "
                      f"({rate_flags(args, 0.1)})"))
    elif largest < LOW_RATIO:
        found.append(("learning rate too low",
                      f"one step changes the weights by at most {largest:.1e} of their size (about 1e-3 is "
                      f"healthy): nothing moves. Try a learning rate 100 to 1000 times larger "
                      f"({rate_flags(args, 1000)}; the defaults are --lr {m.ADAM_LR}, --sgd-lr {m.SGD_LR})"))

    if math.isfinite(f.first) and abs(f.first - LN10) > INITIAL_LOSS_OFF:
        found.append(("initial loss far from ln(10)",
                      f"the first loss is {f.first:.3f}, not about {LN10:.3f}: the initial weights make "
                      "confident guesses before learning anything. Try smaller initial weights (PyTorch's "
                      "default, in init_params) or check the input scaling"))

    if f.stats is not None:
        dead = [f"{label}: {100 * share:.0f}% of {units}" for label, _, _, share, units in f.stats
                if share is not None and share >= DEAD_SHARE]
        if dead:
            found.append(("dead units",
                          f"ReLU units never active ({'; '.join(dead)} units) pass no gradient, so they never "
                          "come back. Try a lower learning rate, batch norm before the ReLU (bn relu), or "
                          "look for a large negative bias"))

    if not f.blew_up and (f.first - f.end) / f.first < LEARNED_SHARE:
        cannot = f.fit is not None and not f.fit[1] < NEAR_ZERO
        found.append(("not learning",
                      f"in {f.done} steps the loss went from {f.first:.3f} to {f.end:.3f}"
                      + (", and 100 examples cannot be overfit" if cannot else "")
                      + ". See the verdicts above, if any; else try a larger learning rate and check "
                      "that the labels match the images"))

    if f.weights and f.done:
        # a gradient's largest size against its size in the first step
        rise = {n: max(rec.grad_rms[n][:f.done]) / max(rec.grad_rms[n][0], 1e-30) for n in f.weights}
        exploded = [f"{n}'s {rise[n]:.3g}-fold" for n in f.weights if not rise[n] <= EXPLODED]
        if exploded:
            found.append(("exploding gradients",
                          f"the gradients grew from their size at the first step: {', '.join(exploded)}. "
                          "Try a lower learning rate, batch norm after each conv, or clipping the gradient"))
        # each weight's gradient relative to its size, against the largest such
        relative = {n: median(rec.grad_rms[n]) / max(size_now[n], 1e-30) for n in f.weights}
        top = max(relative.values())
        vanished = [f"{n}'s is " + (f"{relative[n] / top:.0e}" if relative[n] else "exactly 0")
                    for n in f.weights if relative[n] < VANISHED * top]
        if vanished and not f.blew_up:
            found.append(("vanishing gradients",
                          f"against the largest gradient (each relative to its weights), {', '.join(vanished)}: "
                          "the layers there barely learn. Look for dead ReLUs or saturated layers between "
                          "them and the output; batch norm and PyTorch's initial weights keep gradients alive"))

    if f.fit is not None and not f.fit[1] < NEAR_ZERO and not any(p == "not learning" for p, _ in found):
        found.append(("cannot overfit 100 examples",
                      f"their loss is still {f.fit[1]:.3f} after {f.fit[0]} steps: a network that learns "
                      "drives it to near zero. Check the backward pass (--gradcheck), and try a larger "
                      "learning rate or a wider network"))
    return found


def diagnose(args, data, out=print, steps=None, overfit_steps=None, prepare=None):
    """--diagnose: train `steps` steps (STEPS) with the run's recipe, report, and name the problems.
    prepare(net), if given, changes the fresh network before the first step (the tests break
    networks with it).  Returns the verdicts, [(problem, what to try)]; [] when none was found."""
    steps, overfit_steps = steps or STEPS, overfit_steps or OVERFIT_STEPS
    rates = {"dual": f"Adam lr {args.lr:g} + SGD lr {args.sgd_lr:g}", "adam": f"lr {args.lr:g}",
             "adamw": f"lr {args.lr:g}, weight decay {args.weight_decay:g}",
             "momentum": f"SGD lr {args.sgd_lr:g}, momentum {args.momentum:g}"}[args.optimizer]
    out(f"Diagnosis: the first {steps} steps of the run of")
    out(f"  --net \"{args.net}\"")
    out(f"  optimizer {args.optimizer} ({rates}), batch {args.batch_size}, {args.schedule} schedule")
    f = measure(args, data, steps, overfit_steps, prepare)
    for line in report(f):
        out(line)
    found = verdicts(f, args)
    out("")
    for problem, advice in found:       # a verdict's advice goes on, indented, under its first line
        for line in wrap(f"verdict: {problem}: {advice}.", "  ", ""):
            out(line)
    if not found:
        for line in wrap("verdict: no problem found: the first loss is about ln(10), the loss falls, no "
                         "ReLU layer is mostly dead, the gradients neither explode nor vanish, and 100 "
                         "examples are overfit.", "  ", ""):
            out(line)
    return found
