"""How well does a saved model read digits photographed like a person's own?

    python3 tests/handwriting_check.py m.npz [--data-dir mnist_data]

Two sets of pictures, each made in memory and run through the same preparation
as --predict (tools/own_digits.py, mnist_like):
- 100 digits drawn with a pen on grainy, unevenly lit grey paper (drawn_digits.py),
  of many sizes and pen widths, off centre;
- 200 MNIST test digits enlarged 3-8 times and pasted the same way on paper
  (real handwriting shapes), next to the same digits as plain MNIST images.
Not a test (it needs a trained model); docs/looking_inside.md quotes its output.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import mnist_net as m  # noqa: E402
from tools import own_digits  # noqa: E402
from tools.model_files import load_model  # noqa: E402
from drawn_digits import draw_digit  # noqa: E402


def enlarge(image, k):
    """Bilinear enlargement of a 2-D array by the factor k."""
    def weights(n_in, n_out):
        pos = np.clip((np.arange(n_out) + 0.5) / k - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = np.zeros((n_out, n_in))
        w[np.arange(n_out), lo] += 1 - (pos - lo)
        w[np.arange(n_out), hi] += pos - lo
        return w
    h, w = image.shape
    return weights(h, int(h * k)) @ image @ weights(w, int(w * k)).T


def on_paper(coverage, rng, canvas):
    """Ink `coverage` (0-1) pasted at a random place on grey, grainy, unevenly lit paper."""
    H, W = canvas
    paper = rng.uniform(150, 230) + rng.normal(0, rng.uniform(3, 15), (H, W)) + np.linspace(-15, 15, W)[None]
    y0, x0 = rng.integers(0, H - coverage.shape[0] + 1), rng.integers(0, W - coverage.shape[1] + 1)
    cov = np.zeros((H, W))
    cov[y0:y0 + coverage.shape[0], x0:x0 + coverage.shape[1]] = coverage
    return np.clip(paper * (1 - cov) + rng.uniform(10, 80) * cov, 0, 255)


def classify(net, picture):
    return int(m.predict_proba(net, own_digits.mnist_like(picture)[None])[0].argmax())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data-dir", default=m.DATA_DIR)
    args = p.parse_args()
    net = load_model(args.model)
    rng = np.random.default_rng(1000)
    right = 0
    for _ in range(10):
        for digit in range(10):
            canvas = (int(rng.integers(200, 480)), int(rng.integers(200, 640)))
            height = int(rng.integers(60, min(canvas) - 20))
            picture = draw_digit(digit, rng, canvas=canvas, height=height,
                                 pen=float(rng.uniform(0.03, 0.12) * height), ink=int(rng.integers(10, 90)),
                                 paper=int(rng.integers(150, 230)), grain=float(rng.uniform(3, 18)),
                                 centre=(canvas[0] * rng.uniform(0.35, 0.65), canvas[1] * rng.uniform(0.3, 0.7)),
                                 slant=float(rng.uniform(-0.1, 0.3)))
            right += classify(net, picture.astype(float)) == digit
    print(f"drawn digits: {right}/100 read correctly")
    _, _, test_x, test_y = m.load_mnist(args.data_dir)
    chosen = rng.choice(len(test_x), min(200, len(test_x)), replace=False)
    right = 0
    for i in chosen:
        k = rng.uniform(3, 8)
        digit = np.clip(enlarge(test_x[i] / 255.0, k), 0, 1)
        canvas = (int(digit.shape[0] * rng.uniform(1.2, 2.0)), int(digit.shape[1] * rng.uniform(1.2, 2.5)))
        right += classify(net, on_paper(digit, rng, canvas)) == test_y[i]
    plain = int((m.predict_proba(net, test_x[chosen]).argmax(axis=1) == test_y[chosen]).sum())
    print(f"MNIST test digits as photos: {right}/{len(chosen)} read correctly "
          f"(as plain MNIST images: {plain}/{len(chosen)})")


if __name__ == "__main__":
    main()
