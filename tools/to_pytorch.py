"""Load a model saved by mnist_net.py --save-model into the same network built in PyTorch.

    python3 -m tools.to_pytorch MODEL.npz [--data-dir mnist_data] [--log mnist_test_log.txt]

Builds nn.Sequential from the spec stored in the file (the grammar of --net), copies
every parameter and buffer in (the names and layouts are PyTorch's state_dict ones),
classifies the test set in eval() mode and prints the accuracy; with --log (the
predictions log of a mnist_net run of the same model), also how many of the
predictions agree.  Needs torch (pip install torch); mnist_net.py itself does not.
"""
import argparse
import os
import re
import sys

import numpy as np


def build(spec, in_shape=(1, 28, 28)):
    """nn.Sequential for a spec, and [(state name prefix, module)] for conv1, bn1, fc1, ..."""
    import torch.nn as nn
    modules, named, counts, shape = [], [], {}, in_shape
    for token in re.split(r"[,\s]+", spec.strip()):
        kind = re.match(r"[a-z]+", token).group()
        if kind == "conv":
            f, k, p = (int(g) if g else d for g, d in zip(
                re.fullmatch(r"conv(\d+)(?:x(\d+))?(?:p(\d+))?", token).groups(), (None, 3, 0)))
            module = nn.Conv2d(shape[0], f, k, padding=p)
            shape = (f, shape[1] + 2 * p - k + 1, shape[2] + 2 * p - k + 1)
        elif kind == "bn":
            module = nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
        elif kind == "relu":
            module = nn.ReLU()
        elif kind == "pool":
            module, shape = nn.MaxPool2d(2), (shape[0], shape[1] // 2, shape[2] // 2)
        elif kind == "dropout":
            module = nn.Dropout(float(token[len("dropout"):]))
        else:                                                     # fcM, after a Flatten for maps
            if len(shape) == 3:
                modules.append(nn.Flatten())
                shape = (shape[0] * shape[1] * shape[2],)
            module, shape = nn.Linear(shape[0], int(token[2:])), (int(token[2:]),)
        if kind in ("conv", "bn", "fc"):
            counts[kind] = counts.get(kind, 0) + 1
            named.append((f"{kind}{counts[kind]}", module))
        modules.append(module)
    return nn.Sequential(*modules), named


def load(path):
    """(model in eval mode, input mean, input std) from a mnist_net .npz file."""
    import torch
    from tools.model_files import load_model
    net = load_model(path)                     # checks the file and reads old-style names too
    model, named = build(net.spec)
    for prefix, module in named:
        state = {key.split(".", 1)[1]: torch.from_numpy(np.array(value))
                 for key, value in net.state.items() if key.split(".", 1)[0] == prefix}
        module.load_state_dict(state)
    return model.eval(), net.mean, net.std     # the input scaling it was trained with


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m tools.to_pytorch", description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--data-dir", default=None, help="the test files (default: the model's data set folder)")
    p.add_argument("--log", default=None, help="a predictions log of the same model, to compare with")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("error: this needs PyTorch: pip install torch")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mnist_net
    from tools.model_files import ModelFileError, model_inputs
    try:
        model, mean, std = load(args.model)
        data_set = model_inputs(args.model)[0]
        images, labels = mnist_net.load_split(args.data_dir or data_set.folder, "test", data_set.title)
    except (ModelFileError, mnist_net.DataError) as e:
        sys.exit(f"error: {e}")
    x = (torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 255 - mean) / std
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)]).numpy()
    print(f"PyTorch: {model}")
    print(f"PyTorch test accuracy: {100 * (pred == labels).mean():.2f}%")
    if args.log:
        with open(args.log) as f:
            ours = np.array([int(line.split()[0]) for line in f if not line.startswith("#")])
        agree = int((ours == pred).sum())
        print(f"agreement with {args.log}: {agree} of {len(pred)} predictions ({100 * agree / len(pred):.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
