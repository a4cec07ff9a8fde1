"""Model files: a trained network saved as an .npz and loaded back (--save-model, --load-model).

The file holds every parameter and buffer under PyTorch's state_dict names and layouts
(conv1.weight, bn1.running_mean, fc2.bias, ...), the network's spec, the data set it was
trained on and the input scaling it was trained with, so tools/to_pytorch.py can load it
into PyTorch and --load-model can rebuild it exactly.
"""
import os

import numpy as np

import mnist_net


class ModelFileError(Exception):
    """A model file is missing, damaged or made for another network."""


def write_atomically(path, write):
    """Call write(f) on a temporary file beside `path`, then rename it over `path`.

    An interrupted or failing run leaves the previous file as it was, never half a file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(path, net, config, dataset="mnist"):
    """An .npz with the spec, every parameter and buffer, the data set it was trained on
    (its --dataset name), the network's input scaling (net.mean, net.std) and the config."""
    arrays = dict(net.state)
    arrays["spec"] = np.array(net.spec)
    arrays["dataset"] = np.array(dataset)
    # float64, as the network holds them: a loaded network scales its inputs exactly as the
    # trained one did, and predicts the very same probabilities
    arrays["input_mean"] = np.float64(net.mean)
    arrays["input_std"] = np.float64(net.std)
    arrays["config"] = np.array(config)
    write_atomically(path, lambda f: np.savez(f, **arrays))


# the names this program used before networks were lists of layers (one conv, two dense)
LEGACY_NAMES = {"conv.weight": "conv1.weight", "conv.bias": "conv1.bias"}


def read_model_file(path):
    """Every array of a model file, by name; ModelFileError if it is not a readable .npz."""
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a folder, not a model file")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file; train and save one with --save-model") from None
    except Exception:
        raise ModelFileError(f"{path}: not a model file saved by mnist_net (--save-model writes "
                             "an .npz of the network's arrays)") from None


def model_inputs(path, stored=None):
    """(data set, input mean, input std) a model file was trained with.  A file from
    before --dataset has no data set field: it was trained on MNIST."""
    stored = read_model_file(path) if stored is None else stored
    key = str(stored["dataset"]) if "dataset" in stored else "mnist"
    if key not in mnist_net.DATASETS:
        raise ModelFileError(f"{path}: trained on an unknown data set {key!r} "
                             f"(this program knows {', '.join(mnist_net.DATASETS)})")
    for name in ("input_mean", "input_std"):
        if name not in stored:
            raise ModelFileError(f"{path}: not an mnist_net model, missing {name}")
        a = stored[name]
        if a.ndim != 0 or not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a):
            raise ModelFileError(f"{path}: {name} is not a finite number")
    if stored["input_std"] <= 0:
        raise ModelFileError(f"{path}: input_std is {stored['input_std']}, not a positive number")
    return mnist_net.DATASETS[key], float(stored["input_mean"]), float(stored["input_std"])


def seed_spec(filters=mnist_net.FILTERS, hidden=mnist_net.HIDDEN):
    """The original network with its two widths."""
    return f"conv{filters} relu pool fc{hidden} relu fc{mnist_net.CLASSES}"


def chapter_copy(net):
    """A network of the chapter's layers holding a copy of net's state and input scaling: net may
    be the fast path's; the copy's layers hand each other plain (N, C, H, W) maps in the printed
    order, and what a tool's forward or backward writes into it (caches, gradients, batch norm
    statistics) leaves net as it was."""
    copy = mnist_net.Network(net.spec, np.random.default_rng(0), net.flat.dtype, mean=net.mean, std=net.std)
    for name, value in net.state.items():
        copy.state[name][...] = value
    return copy


def load_model(path, network=mnist_net.Network):
    """The network a file from save_model holds (built as `network`: the chapter's Network or
    the fast path's), with the input scaling it recorded; ModelFileError saying what is wrong."""
    stored = read_model_file(path)
    if "spec" not in stored and "conv.bias" in stored:
        # a file from before --net: the seed network, its widths read off the arrays
        for name in ("conv.bias", "fc1.bias"):
            if name not in stored or stored[name].ndim != 1:
                raise ModelFileError(f"{path}: {name} is {'missing' if name not in stored else 'not a vector'}: "
                                     "not a model file this program (or its previous version) wrote")
        stored = {LEGACY_NAMES.get(k, k): v for k, v in stored.items()}
        stored["spec"] = np.array(seed_spec(stored["conv1.bias"].shape[0], stored["fc1.bias"].shape[0]))
    missing = [n for n in ("spec", "input_mean", "input_std") if n not in stored]
    if missing:
        raise ModelFileError(f"{path}: not an mnist_net model, missing {', '.join(missing)}")
    try:
        net = network(str(stored["spec"]), np.random.default_rng(0))
    except mnist_net.SpecError as e:
        raise ModelFileError(f"{path}: its network spec is not valid ({e})") from None
    _, net.mean, net.std = model_inputs(path, stored)      # the input scaling it was trained with
    missing = [name for name in net.state if name not in stored]
    if missing:
        raise ModelFileError(f"{path}: missing {', '.join(missing)} for the network \"{net.spec}\"")
    for name, target in net.state.items():
        a = stored[name]
        counter = name.endswith("num_batches_tracked")
        kind, word = (np.integer, "integers") if counter else (np.floating, "floats")
        if not np.issubdtype(a.dtype, kind) or not np.all(np.isfinite(a)):
            raise ModelFileError(f"{path}: {name} is not an array of finite {word}")
        if a.shape != target.shape:
            raise ModelFileError(f"{path}: {name} has shape {a.shape}, expected {target.shape} "
                                 f"for the network \"{net.spec}\"")
        target[...] = a
    return net
