"""Pictures of digits drawn the way a person photographs or scans their own:
dark pen strokes on light grey, grainy paper, on a canvas of another size and
shape than the digit, off centre and much larger than MNIST's 20 pixels."""
import numpy as np

# Each digit as strokes in a box 0..1 wide and 0..1.6 tall (x right, y down);
# a stroke is a list of points joined by straight segments.


def _arc(cx, cy, rx, ry, start, end, n=24):
    t = np.radians(np.linspace(start, end, n))
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))


STROKES = {
    0: [_arc(0.5, 0.8, 0.42, 0.75, 0, 360, 40)],
    1: [[(0.3, 0.35), (0.55, 0.05), (0.55, 1.55)]],
    2: [_arc(0.5, 0.45, 0.4, 0.38, 200, 380) + [(0.08, 1.52), (0.95, 1.52)]],
    3: [_arc(0.48, 0.42, 0.38, 0.36, 210, 450), _arc(0.48, 1.13, 0.44, 0.42, 270, 510)],
    4: [[(0.62, 0.05), (0.05, 1.05), (0.95, 1.05)], [(0.7, 0.45), (0.7, 1.55)]],
    5: [[(0.9, 0.06), (0.2, 0.06), (0.13, 0.68)], _arc(0.47, 1.07, 0.43, 0.45, 225, 500)],
    6: [[(0.75, 0.05), (0.35, 0.5)] + _arc(0.5, 1.12, 0.4, 0.42, 200, 560, 36)],
    7: [[(0.05, 0.06), (0.95, 0.06), (0.35, 1.55)]],
    8: [_arc(0.5, 0.42, 0.33, 0.37, 0, 360, 32), _arc(0.5, 1.16, 0.42, 0.4, 0, 360, 32)],
    9: [_arc(0.48, 0.47, 0.38, 0.42, 0, 360, 32), [(0.86, 0.5), (0.8, 1.55)]],
}


def distance_to_strokes(points, strokes):
    """Distance from every point (P, 2) to the nearest segment of the strokes."""
    best = np.full(len(points), np.inf)
    for stroke in strokes:
        s = np.asarray(stroke, float)
        for a, b in zip(s[:-1], s[1:]):
            ab = b - a
            t = np.clip(((points - a) @ ab) / max(ab @ ab, 1e-12), 0, 1)
            best = np.minimum(best, np.linalg.norm(points - (a + t[:, None] * ab), axis=1))
    return best


def draw_digit(digit, rng, canvas=(300, 420), height=150, pen=9.0, ink=50, paper=190, grain=12,
               centre=None, slant=0.15):
    """A grey picture (canvas, uint8) of `digit`: `height` pixels tall, drawn with a pen `pen`
    pixels wide, dark `ink` on `paper` grey with Gaussian grain, its box centred at `centre`."""
    h, w = canvas
    if centre is None:
        centre = (h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7))
    scale = height / 1.6
    jitter = lambda: rng.normal(0, 0.02, 2)
    strokes = []
    for stroke in STROKES[digit]:
        pts = []
        for x, y in stroke:
            x, y = np.array([x, y]) + jitter()
            x += slant * (0.8 - y)                       # a little italic, as handwriting leans
            pts.append((centre[1] + (x - 0.5) * scale, centre[0] + (y - 0.8) * scale))
        strokes.append(pts)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = distance_to_strokes(np.stack([xx.ravel(), yy.ravel()], axis=1), strokes).reshape(h, w)
    coverage = np.clip(pen / 2 + 0.5 - dist, 0, 1)     # anti-aliased pen edge
    shade = paper + rng.normal(0, grain, (h, w)) + np.linspace(-15, 15, w)[None, :]   # uneven light
    picture = shade * (1 - coverage) + (ink + rng.normal(0, grain / 2, (h, w))) * coverage
    return np.clip(picture, 0, 255).astype(np.uint8)


def write_pgm(path, image, binary=True):
    h, w = image.shape
    if binary:
        with open(path, "wb") as f:
            f.write(b"P5\n# drawn for the tests\n%d %d\n255\n" % (w, h) + image.tobytes())
    else:
        rows = "\n".join(" ".join(str(v) for v in row) for row in image)
        with open(path, "w") as f:
            f.write(f"P2\n# drawn for the tests\n{w} {h}\n255\n{rows}\n")
