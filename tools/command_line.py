"""The full command line of python3 mnist_net.py: the chapter's flags (mnist_net.basic_parser)
and the rest, which are about files and tools rather than the network: fetching the data,
saving and loading models, your own pictures, reports, looking inside, the progress line.

mnist_net.main() hands over to main() here when tools/ is beside the chapter.  This module
imports the chapter; the chapter never imports it at module level.
"""
import argparse
import math
import os
import shutil
import sys
import sysconfig
import time

import numpy as np

import mnist_net
from mnist_net import DATASETS, LOG_FILE, checked, positive_int, positive_float
from tools import fetch_data, own_digits, reports
from tools.model_files import ModelFileError, load_model, model_inputs, save_model, seed_spec, write_atomically

EXAMPLES = """examples:
  python3 mnist_net.py                                  train the original network, 5 epochs
  python3 mnist_net.py --net deep                       two conv blocks with batch norm
  python3 mnist_net.py --net "conv16p1 bn relu pool fc10" --epochs 2
  python3 mnist_net.py --plain                          the chapter's own layers
  python3 mnist_net.py --save-model m.npz               train, then keep the network
  python3 mnist_net.py --load-model m.npz --predict my_seven.png
  python3 mnist_net.py --load-model m.npz --why 0 --plot why.png
  python3 mnist_net.py --dataset fashion                clothes instead of digits
  python3 mnist_net.py --serve                          watch it learn, then draw digits in a page
"""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, at most 100 columns wide however wide the terminal, the examples kept as written."""

    def __init__(self, prog):
        super().__init__(prog, width=min(shutil.get_terminal_size().columns - 2, 100))

    def _fill_text(self, text, width, indent):
        return text if text.startswith("examples:") else super()._fill_text(text, width, indent)


def parse_args(argv=None):
    p = mnist_net.basic_parser()
    p.epilog = EXAMPLES
    p.formatter_class = HelpFormatter
    p.add_argument("--weight-decay", type=checked(float, lambda v: math.isfinite(v) and v >= 0, "0 or more"),
                   default=mnist_net.WEIGHT_DECAY,
                   help="adamw's decay of conv and dense weights per step, times the learning rate "
                        "(default: %(default)s)")
    p.add_argument("--sgd-lr", type=positive_float, default=mnist_net.SGD_LR,
                   help="learning rate of SGD with momentum, used by momentum and dual (default: %(default)s)")
    p.add_argument("--momentum", type=checked(float, lambda v: 0 <= v < 1, "at least 0 and below 1"),
                   default=mnist_net.MOMENTUM, help="momentum of the SGD part (default: %(default)s)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine decays both learning rates to 0 over all steps (default: %(default)s)")
    p.add_argument("--filters", type=positive_int, default=None,
                   help=f"conv filters of the seed network (default: {mnist_net.FILTERS})")
    p.add_argument("--hidden", type=positive_int, default=None,
                   help=f"units of the seed network's hidden dense layer (default: {mnist_net.HIDDEN})")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="train on the first N training images only (default: all)")
    fetching = p.add_mutually_exclusive_group()
    fetching.add_argument("--no-download", action="store_true",
                          help="never use the network; stop if a data file is missing")
    fetching.add_argument("--download-only", action="store_true",
                          help="fetch and verify the four files, print their SHA-256, exit")
    p.add_argument("--save-model", metavar="PATH.npz", default=None,
                   help="save the trained weights to this .npz file (default: do not save)")
    p.add_argument("--load-model", metavar="PATH.npz", default=None,
                   help="skip training: evaluate weights saved by --save-model (default: train)")
    looks = p.add_argument_group("looking inside (see docs/looking_inside.md)")
    looks.add_argument("--gradcheck", action="store_true",
                       help="check every backward pass against finite differences (the layers, then "
                            "the --net network, or seed, own and deep), then exit")
    looks.add_argument("--show-mistakes", type=positive_int, metavar="N", default=0,
                       help="draw N misclassified test images in the terminal (default: none)")
    looks.add_argument("--show-filters", action="store_true",
                       help="draw the learned first-layer filters in the terminal")
    looks.add_argument("--history", metavar="PATH.csv", default=None,
                       help="write per-epoch loss, accuracies and seconds as CSV (default: none)")
    looks.add_argument("--plot", metavar="PATH.png", default=None,
                       help="draw curves, filters and mistakes to a PNG (with --show-maps or --why, their "
                            "figure instead); needs matplotlib (default: none)")
    looks.add_argument("--predict", metavar="IMAGE", nargs="+", default=None,
                       help="with --load-model: classify your own pictures (PGM, .npy; PNG and "
                            "JPEG with Pillow) (default: none)")
    looks.add_argument("--show-maps", type=checked(int, lambda v: v >= 0, "0 or more"), metavar="I",
                       default=None,
                       help="draw test image I and the maps after every layer (with --predict, picture I "
                            "of the list, from 0); with --plot, as the PNG's figure (default: none)")
    looks.add_argument("--why", type=checked(int, lambda v: v >= 0, "0 or more"), metavar="I", default=None,
                       help="saliency: the gradient of the predicted class's and the runner-up's scores "
                            "w.r.t. the pixels of test image I (with --predict, picture I) (default: none)")
    looks.add_argument("--trace", type=checked(int, lambda v: v >= 0, "0 or more"), metavar="I", nargs="?",
                       const=0, default=None,
                       help="after training (or with --load-model): follow test image I (0 if left out) "
                            "forward and backward through the network, with numbers to check by hand "
                            "(default: none)")
    looks.add_argument("--diagnose", action="store_true",
                       help="train a fresh network with this run's recipe for a few hundred steps, report "
                            "the first loss, activations, dead ReLUs, gradient and update sizes and whether "
                            "100 examples can be overfit, name the problems found, then exit")
    page = p.add_argument_group("the page (see docs/page.md)")
    page.add_argument("--serve", action="store_true",
                      help="a page to draw digits on and watch the network answer, its maps and "
                           "saliency; trains first (the page shows the curves) unless --load-model")
    page.add_argument("--port", type=checked(int, lambda v: 0 <= v <= 65535, "from 0 to 65535"),
                      default=None, help="the page's port; 0 picks any free one (default: 8000)")
    page.add_argument("--host", default=None,
                      help="the address the page listens on; any other than 127.0.0.1 lets other "
                           "machines open it (default: 127.0.0.1)")
    net_given = argv_has(argv, "--net")
    args = p.parse_args(argv)
    args.net_given = net_given
    check_args(args, p)
    return args


def argv_has(argv, flag):
    """Whether the command line names `flag` (as --flag X or --flag=X)."""
    words = sys.argv[1:] if argv is None else argv
    return any(w == flag or w.startswith(flag + "=") for w in words)


def fail(p, message):
    """One line on stderr naming the flag and what to do, exit 2 (argparse's usage block left out)."""
    p.exit(2, f"{p.prog}: error: {message}\n")


def pip_hint(package):
    """How to install `package` into the Python that runs this (the venv's pip when in one)."""
    if sys.prefix != sys.base_prefix:
        pip = os.path.join(sysconfig.get_path("scripts"), "pip")      # .venv/bin, or .venv\Scripts on Windows
        rel = os.path.relpath(pip)
        return f"{rel if not rel.startswith('..') else pip} install {package}"
    return f"pip install {package}"


def check_args(args, p):
    """Every flag's value checked before any work; one line naming the flag (exit 2)."""
    if args.batch_size is None:
        args.batch_size = mnist_net.DEEP_BATCH_SIZE if (args.net or "").strip() == "deep" else mnist_net.BATCH_SIZE
    args.net = network_spec(args, p)
    for flag, path in (("--log-file", args.log_file), ("--save-model", args.save_model),
                       ("--history", args.history), ("--plot", args.plot)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        shown = os.path.dirname(path) or "."                 # the folder as the user wrote it
        if not path or os.path.isdir(path):
            fail(p, f"{flag} {path!r}: give a file name, not a folder")
        if not os.path.isdir(folder):
            fail(p, f"{flag} {path}: folder {shown} does not exist (create it first)")
        if not os.access(folder, os.W_OK):
            fail(p, f"{flag} {path}: folder {shown} is not writable; pick another path")
    if args.data_dir is not None and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        fail(p, f"--data-dir {args.data_dir}: is a file, not a folder")
    if args.save_model is not None and not args.save_model.endswith(".npz"):
        fail(p, f"--save-model {args.save_model}: the file name must end in .npz")
    if args.load_model is not None and os.path.isdir(args.load_model):
        fail(p, f"--load-model {args.load_model}: is a folder; give a model file saved with --save-model")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        fail(p, f"--load-model {args.load_model}: no such file; train and save one with --save-model")
    if args.predict and not args.load_model:
        fail(p, "--predict needs --load-model PATH.npz (a model saved with --save-model)")
    for path in args.predict or ():
        if os.path.isdir(path):
            fail(p, f"--predict {path}: is a folder; give picture files (PNG, JPEG, PGM, .npy)")
    for flag, i in (("--show-maps", args.show_maps), ("--why", args.why)):
        if args.predict and i is not None and i >= len(args.predict):
            n = len(args.predict)
            fail(p, f"{flag} {i}: with --predict, I counts its pictures from 0, and there "
                    + ("is 1" if n == 1 else f"are {n}"))
    if args.history and args.load_model:
        fail(p, "--history records training: it does not go with --load-model")
    if args.trace is not None and args.predict:
        fail(p, "--trace follows a test image (it needs its label): not with --predict")
    if args.diagnose and (args.load_model or args.save_model or args.trace is not None):
        fail(p, "--diagnose trains a fresh network: not with --load-model, --save-model, --trace")
    if not args.serve and (args.port is not None or args.host is not None):
        fail(p, f"{'--port' if args.port is not None else '--host'} goes with --serve (the page)")
    if args.serve:
        check_serve(args, p)
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        fail(p, f"--plot {args.plot}: the plot is a PNG picture; give a name ending in .png")
    # what is not installed is said now, not after the training; short, to fit 100 columns with the pip
    if args.plot is not None and not has_module("matplotlib"):
        fail(p, f"--plot needs matplotlib: {pip_hint('matplotlib')}")
    pictures = [f for f in args.predict or () if os.path.splitext(f)[1].lower() not in (".pgm", ".pnm", ".npy")]
    if pictures and not has_module("PIL"):
        fail(p, f"--predict {pictures[0]} needs Pillow: {pip_hint('Pillow')}")


def check_serve(args, p):
    """--serve goes with the training flags, --load-model and --save-model, not with the other jobs."""
    others = (("--predict", args.predict is not None), ("--show-maps", args.show_maps is not None),
              ("--why", args.why is not None), ("--trace", args.trace is not None),
              ("--diagnose", args.diagnose), ("--gradcheck", args.gradcheck),
              ("--download-only", args.download_only), ("--history", args.history is not None),
              ("--plot", args.plot is not None), ("--show-mistakes", bool(args.show_mistakes)),
              ("--show-filters", args.show_filters), ("--log-file", args.log_file is not None))
    for flag, given in others:
        if given:
            fail(p, f"--serve shows the network in a page: not with {flag}")
    if args.save_model and args.load_model:
        fail(p, "--save-model with --serve saves the network it trains: not with --load-model")
    if args.host is not None and not args.host.strip():
        fail(p, "--host: give an address: 127.0.0.1 (this machine only), 0.0.0.0 (all)")


def has_module(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def network_spec(args, p):
    """--net (a preset or a spec; --filters and --hidden go with seed) checked by building
    the network once; a bad spec stops here with one line naming the token (exit 2)."""
    spec = "seed" if args.net is None else args.net
    if spec.strip() == "seed":
        spec = seed_spec(args.filters or mnist_net.FILTERS, args.hidden or mnist_net.HIDDEN)
    elif args.filters or args.hidden:
        fail(p, "--filters and --hidden go with the seed network; write widths into --net")
    try:
        return mnist_net.Network(spec, np.random.default_rng(0)).spec
    except mnist_net.SpecError as e:
        fail(p, f"--net: {e}")


class ProgressLine:
    """A live one-line progress report, redrawn in place at most 10 times a second, cleared when
    the epoch is done.  Printed only to a terminal: in a log file it would be thousands of lines."""

    def __init__(self, label, stream=None):
        self.label, self.stream = label, stream or sys.stdout
        self.active = self.stream.isatty()
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done, total, loss):
        now = time.perf_counter()
        if not self.active or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        if done >= total:
            self.stream.write("\r" + " " * 78 + "\r")
        else:
            rate = done / max(now - self.t0, 1e-9)
            eta = (total - done) / rate
            self.stream.write(f"\r{self.label}  {done}/{total}  {rate:,.0f} img/s  "
                              f"ETA {eta:.1f} s  loss {loss:.4f}   ")
        self.stream.flush()


def fetch_missing_files(data_dir, dataset="mnist"):
    """Fetch whichever of the data set's four files data_dir lacks (see tools/fetch_data.py)."""
    missing = [name for name in mnist_net.IDX_NAMES.values() if mnist_net.find_idx_file(data_dir, name) is None]
    if missing:
        fetch_data.fetch_missing(data_dir, missing, dataset=dataset)


def download_only(data_dir, dataset, out=print):
    """--download-only: fetch what is missing, then list the four files with their SHA-256."""
    fetch_missing_files(data_dir, dataset.key)
    paths = {name: mnist_net.find_idx_file(data_dir, name) for name in mnist_net.IDX_NAMES.values()}
    lines = fetch_data.describe_files(paths, mnist_net.read_idx_bytes, dataset.key)
    for line in lines:
        out(line)
    return 0 if all(line.endswith(f"canonical {dataset.title}") for line in lines) else 1


def data_set_of_run(args):
    """This run's data set: --dataset's (MNIST by default), or with --load-model the one the
    model was trained on.  A model of another data set than the one --dataset names is refused."""
    if not args.load_model:
        return DATASETS[args.dataset or "mnist"]
    trained_on, _, _ = model_inputs(args.load_model)
    if args.dataset and args.dataset != trained_on.key:
        asked = DATASETS[args.dataset].title
        raise ModelFileError(f"{args.load_model}: trained on {trained_on.title}, not {asked}; leave out "
                             f"--dataset {args.dataset} to use it on {trained_on.title}, or load a model "
                             f"trained on {asked}")
    return trained_on


def predict_files(net, paths, out=print, dataset=DATASETS["mnist"]):
    """--predict: classify pictures of digits (of clothes, for a Fashion-MNIST model); one
    line each, errors included. Returns the exit code."""
    prepare = own_digits.fashion_like if dataset.key == "fashion" else own_digits.mnist_like
    names = dataset.classes
    failures = 0
    for path in paths:
        try:
            image = prepare(own_digits.read_image(path))
        except own_digits.ImageError as e:
            out(f"{path}: error: {e}")
            failures += 1
            continue
        probs = mnist_net.predict_proba(net, image[None])[0]
        best, second, third = np.argsort(-probs)[:3]
        out(f"{path}: prediction {names[best]} (p={probs[best]:.2f}), then {names[second]} "
            f"(p={probs[second]:.2f}), {names[third]} (p={probs[third]:.2f})")
    return 1 if failures else 0


def first_conv_weight(net):
    """The first conv's weights (F, 1, KH, KW), for the filter pictures; None without a conv."""
    return net.state.get("conv1.weight")


def looking_inside(args):
    """Whether the run asks to look at the network (maps, saliency, trace, plot, filters, mistakes):
    with --load-model, such a run writes no predictions log unless --log-file asks for one."""
    return (args.show_maps is not None or args.why is not None or args.trace is not None
            or args.plot is not None or args.show_filters or bool(args.show_mistakes))


def run(args, out=print):
    """The whole job: data, training (or loading), evaluation, log and reports. Returns the exit code."""
    t_start = time.perf_counter()
    if args.gradcheck:
        from tools import gradcheck          # imports the chapter: only when asked for
        return gradcheck.run_gradient_checks(out, args.net if args.net_given else None)
    if args.download_only:
        dataset = DATASETS[args.dataset or "mnist"]
        return download_only(args.data_dir or dataset.folder, dataset, out)
    if args.serve:
        from tools import page_server            # only when asked for
        return page_server.serve(args, out)
    net = load_model(args.load_model) if args.load_model else None
    dataset = data_set_of_run(args)
    to_input = (lambda images: mnist_net.to_input(images, net.mean, net.std))
    loaded = None if net is None else (f"{args.load_model}: trained on {dataset.title}, inputs scaled with "
                                       f"its mean {net.mean:.4f} and std {net.std:.4f}")
    if args.predict:
        if dataset is not DATASETS["mnist"]:          # an MNIST model's output stays one line per picture
            out(f"Model {loaded}")
        code = predict_files(net, args.predict, out, dataset)
        if args.show_maps is not None or args.why is not None:
            from tools import maps_and_saliency      # only when asked for
            code = max(code, maps_and_saliency.show(args, net, dataset, to_input, write_atomically, out))
        return code
    data_dir = args.data_dir or dataset.folder
    if not args.no_download:
        fetch_missing_files(data_dir, dataset.key)
    data = mnist_net.load_mnist(data_dir, dataset.title)
    _, _, test_x, test_y = data
    if args.diagnose:
        from tools import diagnose               # imports the chapter: only when asked for
        diagnose.diagnose(args, data, out)
        return 0
    for flag, i in (("--trace", args.trace), ("--show-maps", args.show_maps), ("--why", args.why)):
        if i is not None and i >= len(test_y):             # checked before any training
            print(f"error: {flag} {i}: the test set has {len(test_y)} images, 0 to {len(test_y) - 1}",
                  file=sys.stderr)
            return 2
    history = []
    if args.load_model:
        if not args.quiet:
            out(f"Loaded {loaded}")
        config = f"loaded from {args.load_model}: net=\"{net.spec}\""
        evaluation = mnist_net.evaluate(net, test_x, test_y)
    else:
        config = (f"epochs={args.epochs} batch_size={args.batch_size} optimizer={args.optimizer} "
                  f"lr={args.lr} sgd_lr={args.sgd_lr} momentum={args.momentum} schedule={args.schedule} "
                  f"seed={args.seed} limit={args.limit} net=\"{args.net}\""
                  + (f" weight_decay={args.weight_decay}" if args.optimizer == "adamw" else ""))
        network, optimizer = mnist_net.choose_layers(args, out)
        net, history, evaluation = mnist_net.train(args, data, out, network, optimizer, ProgressLine)
        to_input = (lambda images: mnist_net.to_input(images, net.mean, net.std))
    accuracy, pred, probs = evaluation
    report = reports.confusion_report(reports.confusion_matrix(pred, test_y), dataset.classes)
    # Looking inside a loaded model writes no log unless asked (--log-file): the log of the
    # training run stays.  Otherwise the files first: a closed output (| head) or Ctrl-C while
    # printing loses no results.
    log_file = args.log_file or (None if args.load_model and looking_inside(args) else LOG_FILE)
    if log_file:
        header = [f"mnist_net  {config}"]
        if dataset is not DATASETS["mnist"]:      # digits are their own names: MNIST's log stays as it was
            header.append(f"data set {dataset.title}; labels: "
                          + ", ".join(f"{i} {name}" for i, name in enumerate(dataset.classes)))
        header += [f"test accuracy {100 * accuracy:.2f}% on {len(test_y)} images"] + report
        text = mnist_net.log_text(pred, test_y, header)
        write_atomically(log_file, lambda f: f.write(text.encode()))
    if args.save_model:
        save_model(args.save_model, net, config, dataset.key)
    if args.history:
        reports.write_history(args.history, history, write_atomically)
    out(f"Full {dataset.title} test accuracy: {100 * accuracy:.2f}%")
    out(f"Predictions: {pred[:10]}")
    out(f"Actual:      {test_y[:10]}")
    if not args.quiet:
        for line in report:
            out(line)
    if log_file:
        out(f"Wrote {len(pred)} predictions to {log_file}")
    elif not args.quiet:
        out(f"No log written: looking inside leaves {LOG_FILE} as it was (--log-file PATH writes one)")
    if args.save_model:
        out(f"Saved the model to {args.save_model}")
    if args.history:
        out(f"Wrote the training history to {args.history}")
    if args.show_filters:
        reports.show_filters(first_conv_weight(net), out)
    if args.show_mistakes:
        reports.show_mistakes(test_x, test_y, pred, probs, args.show_mistakes, out, dataset.classes)
    maps_or_why = args.show_maps is not None or args.why is not None     # their figure goes to --plot
    if args.plot and not maps_or_why and reports.plot(args.plot, history, first_conv_weight(net), test_x,
                                                      test_y, pred, probs, write_atomically, out,
                                                      dataset.classes):
        out(f"Wrote the plot to {args.plot}")
    if maps_or_why:
        from tools import maps_and_saliency      # only when asked for
        maps_and_saliency.show(args, net, dataset, to_input, write_atomically, out, (test_x, test_y))
    if args.trace is not None:
        from tools import trace                  # imports the chapter: only when asked for
        i = args.trace
        trace.trace(net, to_input(test_x[i:i + 1]), test_y[i], i, out, dataset.classes)
    if not args.quiet:
        out(f"Total time {time.perf_counter() - t_start:.1f} s")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (mnist_net.DataError, fetch_data.FetchError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
    except mnist_net.NonFiniteLoss as e:
        print(f"\nerror: {e}; lower the learning rate (--lr, --sgd-lr)", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nInterrupted. Files written so far are complete; none was left half-written.",
              file=sys.stderr)
        return 130
    except BrokenPipeError:           # the output went to a command that stopped reading (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 1
    except OSError as e:              # a folder that became unwritable, a full disk, ...
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
    return 1
