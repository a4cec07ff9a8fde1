"""Your own digits for --predict: reading PGM/.npy/PNG/JPEG, preparing them like MNIST
(or, for a Fashion-MNIST model, a photo of clothing like Fashion-MNIST: fashion_like).

    python3 mnist_net.py --load-model m.npz --predict my_digit.png
"""
import os

import numpy as np


class ImageError(Exception):
    """An image could not be read or holds no digit."""


def read_pgm(path):
    """A PGM file (P2 text or P5 binary) as a 2-D float array, 0 = black, 255 = white."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot be read ({e.strerror or e})") from None
    fields, pos = [], 0
    while len(fields) < 4:                       # magic, width, height, maxval; '#' starts a comment
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ImageError("truncated PGM header")
        fields.append(data[start:pos])
    magic = fields[0]
    try:
        width, height, maxval = (int(v) for v in fields[1:])
    except ValueError:
        raise ImageError("bad PGM header") from None
    if magic not in (b"P2", b"P5") or width <= 0 or height <= 0 or not 0 < maxval < 65536:
        raise ImageError("not a PGM image (P2 or P5)")
    if magic == b"P5":
        dtype = ">u2" if maxval > 255 else "u1"
        body = data[pos + 1:]
        count = width * height
        if len(body) < count * np.dtype(dtype).itemsize:
            raise ImageError("PGM file is truncated")
        pixels = np.frombuffer(body, dtype, count=count)
    else:
        try:
            pixels = np.array(data[pos:].split(), dtype=np.int64)
        except ValueError:
            raise ImageError("bad pixel values in PGM file") from None
        if pixels.size < width * height:
            raise ImageError("PGM file is truncated")
        pixels = pixels[:width * height]
    if pixels.min() < 0 or pixels.max() > maxval:
        raise ImageError(f"PGM pixel values outside 0-{maxval}")
    return pixels.reshape(height, width).astype(np.float64) * (255.0 / maxval)


def read_image(path):
    """Any supported picture as a 2-D float array of grey levels, 0 = black, 255 = white."""
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        raise ImageError("is a folder, not a picture")
    if not os.path.isfile(path):
        raise ImageError("no such file")
    if ext in (".pgm", ".pnm"):
        return read_pgm(path)
    if ext == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ImageError(f"not a readable .npy file ({e})") from None
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., :3].mean(axis=-1)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise ImageError(f"a .npy image must be a 2-D array of numbers, got shape {a.shape}")
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ImageError("the .npy image holds NaN or infinite values")
        return a * 255 if a.size and a.max() <= 1.0 else a
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImageError(f"reading {ext or 'this'} files needs Pillow (pip install pillow); "
                         "PGM and .npy files work without it") from None
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)          # a phone photo stores its rotation apart
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                white = Image.new("RGBA", im.size, "white")
                im = Image.alpha_composite(white, im.convert("RGBA"))   # transparent = paper
            return np.asarray(im.convert("L"), dtype=np.float64)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"not a readable image ({e})") from None


def resize_area(image, height, width):
    """Resize by averaging: each output pixel is the mean of the input area it covers."""

    def weights(n_in, n_out):
        # w[o, i] = overlap of input pixel i with output pixel o's span, in input pixels
        edges = np.linspace(0, n_in, n_out + 1)
        lo, hi = edges[:-1, None], edges[1:, None]
        i = np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
        return overlap / overlap.sum(axis=1, keepdims=True)

    return weights(image.shape[0], height) @ image @ weights(image.shape[1], width).T


def dilate(image, radius):
    """Grey-level dilation with a disc: thickens strokes by `radius` pixels."""
    out = image.copy()
    h, w = image.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius or (dy == 0 and dx == 0):
                continue
            shifted = np.zeros_like(image)
            shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            np.maximum(out, shifted, out=out)
    return out


def box_blur(image, radius):
    """Mean over a (2r+1)x(2r+1) square around each pixel (edges: the square cut to the image)."""
    if radius < 1:
        return image
    def along(a, axis):
        a = np.moveaxis(a, axis, 0)
        c = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])
        n = a.shape[0]
        hi = np.minimum(np.arange(n) + radius + 1, n)
        lo = np.maximum(np.arange(n) - radius, 0)
        shape = (-1,) + (1,) * (a.ndim - 1)
        return np.moveaxis((c[hi] - c[lo]) / (hi - lo).reshape(shape), 0, axis)
    return along(along(image, 0), 1)


def paper_level(ink):
    """The paper's own level under every pixel, uneven lighting included: a smooth
    surface (quadratic in x and y) fitted to the pixels that are not ink.  Each round
    refits without the pixels that stand well above the last fit (ink is bright here)."""
    h, w = ink.shape
    y, x = np.mgrid[0:h, 0:w]
    y, x = (2 * y / max(h - 1, 1) - 1).ravel(), (2 * x / max(w - 1, 1) - 1).ravel()
    terms = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)      # (h*w, 6)
    values = ink.ravel()
    sample = np.arange(0, h * w, max(1, h * w // 20000))    # a spread-out subset is enough
    if max(h, w) < 100:
        terms = terms[:, :3]             # a small, tight crop: a plane, which ink cannot bend much
    # start from the darker half (ink is bright here and covers less than half of a picture)
    paper = sample[values[sample] <= np.median(values[sample])]
    for _ in range(5):
        coef, *_ = np.linalg.lstsq(terms[paper], values[paper], rcond=None)
        residual = values[sample] - terms[sample] @ coef
        spread = 1.4826 * np.median(np.abs(residual)) + 1e-9
        paper = sample[residual < 2.5 * spread]
    return (terms @ coef).reshape(h, w)


def keep_large_parts(mask, share=0.1):
    """The mask without specks: only connected parts (8 neighbours) with at least `share` of
    the largest part's pixels (a 5's separate top bar stays, a crumb on the paper goes).

    In NumPy, on runs rather than pixels (a 280x280 pad holds a few hundred runs, not tens
    of thousands of ink pixels to visit one by one):
    1) the runs: each row's stretches of True, as (row, first column, column after the last);
    2) a run touches the runs of the next row whose columns reach within one of its own
       (diagonal neighbours included); those are a contiguous block of that row's runs;
    3) join the touching runs: each run points to the smallest run it is joined with,
       directly or through others (hooking, then pointer jumping, until nothing changes);
    4) a part's size is the sum of its runs' lengths; keep the runs of the large parts.
    """
    h, w = mask.shape
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)      # (h, w + 1)
    rows, starts = np.nonzero(edges == 1)                                         # 1)
    ends = np.nonzero(edges == -1)[1]          # row by row, in order: each run's own end
    if len(rows) == 0:
        return np.zeros_like(mask, dtype=bool)
    # 2) one number per position, row * key + column (key > w: rows never mix, sorted as the
    #    runs are); each run's start and end moved one row up, so that searching them with a
    #    run's own columns finds the runs of the next row: their end >= its start, start <= its end
    key = w + 2
    up_starts, up_ends = (rows - 1) * key + starts, (rows - 1) * key + ends
    first = np.searchsorted(up_ends, rows * key + starts, side="left")
    last = np.searchsorted(up_starts, rows * key + ends, side="right")
    count = np.maximum(last - first, 0)                       # the runs below each run touches
    upper = np.repeat(np.arange(len(rows)), count)            # the touching pairs (upper, lower)
    lower = np.repeat(first, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    parent = np.arange(len(rows))                                                 # 3)
    while True:
        low = np.minimum(parent[upper], parent[lower])
        np.minimum.at(parent, parent[upper], low)
        np.minimum.at(parent, parent[lower], low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        if np.array_equal(parent[upper], parent[lower]):
            break
    sizes = np.bincount(parent, weights=ends - starts)                            # 4)
    keep = sizes[parent] >= share * sizes.max()
    marks = np.zeros((h, w + 1), np.int8)
    marks[rows[keep], starts[keep]] = 1
    marks[rows[keep], ends[keep]] = -1
    return np.cumsum(marks, axis=1)[:, :w] > 0


def checked_and_shrunk(grey):
    """A 2-D float picture of finite values, shrunk (area averaging) to at most 600 pixels a side."""
    grey = np.asarray(grey, dtype=np.float64)
    if grey.ndim != 2 or min(grey.shape) < 2:
        raise ImageError("not a 2-D picture")
    if not np.all(np.isfinite(grey)):
        raise ImageError("the picture holds NaN or infinite values")
    if max(grey.shape) > 600:
        k = 600 / max(grey.shape)
        grey = resize_area(grey, max(2, round(grey.shape[0] * k)), max(2, round(grey.shape[1] * k)))
    return grey


def mnist_like(grey):
    """A picture of one digit (2-D grey levels, any size) -> 28x28 uint8 the way MNIST was made.

    0) shrink a picture larger than 600 pixels (plenty for a 20-pixel digit; keeps it fast);
    1) ink bright on black: invert when the background (the median grey) is the
       lighter side of the picture;
    2) remove the paper: subtract its level (uneven lighting included), keep what stands
       clearly above the grain, stretch the ink to 1;
    3) crop to the ink's bounding box;
    4) thicken strokes that are thin for the digit's size (a fine pen on a large picture);
    5) scale the longer side to 20 pixels, keeping the aspect ratio (area averaging);
    6) place it in 28x28 with its centre of mass at the centre.
    """
    grey = checked_and_shrunk(grey)                                                   # 0)
    blurred = box_blur(grey, 1)            # so that single grains do not count as extremes
    ink = 255 - grey if np.median(grey) > (blurred.min() + blurred.max()) / 2 else grey.copy()  # 1)
    h, w = ink.shape
    ink -= paper_level(ink)                                                          # 2)
    smooth = box_blur(ink, max(1, min(h, w) // 150))       # grain averages out, strokes stay
    noise = 1.4826 * np.median(np.abs(smooth - np.median(smooth)))
    strong = smooth.max()                  # the blur keeps a lone hot pixel from counting
    if strong < 24 or strong < 6 * noise:
        raise ImageError("no digit found (nothing stands out from the background)")
    mask = keep_large_parts(smooth > max(0.35 * strong, 5 * noise))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    ink = np.clip(smooth / strong, 0, 1) * mask
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]                             # 3)
    side = max(ink.shape)
    # 4) MNIST strokes are about 2.5 px wide in a 20 px box. Estimate this drawing's
    # stroke width as ink area / (2.5 * box side) (a digit's strokes run about 2.5 box sides)
    width = (ink > 0.5).sum() / (2.5 * side)
    wanted = 2.5 * side / 20
    if width < wanted and side > 20:
        grow = int(round((wanted - width) / 2))
        ink = dilate(np.pad(ink, grow), grow)      # padded: the strokes may grow past the crop
    h, w = ink.shape                                                                  # 5)
    scale = 20 / max(h, w)
    small = resize_area(ink, max(1, round(h * scale)), max(1, round(w * scale)))
    small = np.clip(small / max(small.max(), 1e-9), 0, 1)
    canvas = np.zeros((28, 28))                                                       # 6)
    total = small.sum()
    cy = (small.sum(axis=1) @ np.arange(small.shape[0])) / total
    cx = (small.sum(axis=0) @ np.arange(small.shape[1])) / total
    top = min(max(int(round(13.5 - cy)), 0), 28 - small.shape[0])
    left = min(max(int(round(13.5 - cx)), 0), 28 - small.shape[1])
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return np.round(canvas * 255).astype(np.uint8)



def fashion_like(grey):
    """A photo of one piece of clothing (2-D grey levels, any size) -> 28x28 uint8 the way
    Fashion-MNIST was made from Zalando's product photos (on a white background):

    0) shrink a picture larger than 600 pixels;
    1) the background is the median of the border pixels; negate the picture when that is
       the light side, so that the garment is bright on black, and take the background's
       level away;
    2) trim the rows and columns that hold only background (within 5% of full scale, as
       Zalando trimmed);
    3) scale the longer side to 28 pixels, keeping the aspect ratio (area averaging);
    4) centre it in 28x28.
    Unlike a digit's strokes, the grey shading is part of the picture: no threshold, no thickening.
    """
    grey = checked_and_shrunk(grey)                                                   # 0)
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    background = np.median(border)
    ink = 255 - grey if background > 127.5 else grey.copy()                           # 1)
    ink = np.clip(ink - min(background, 255 - background), 0, 255)
    found = ink > 0.05 * 255
    if not found.any():
        raise ImageError("nothing found (the picture is all background)")
    rows, cols = np.flatnonzero(found.any(axis=1)), np.flatnonzero(found.any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]                            # 2)
    h, w = ink.shape                                                                  # 3)
    scale = 28 / max(h, w)
    small = resize_area(ink, max(1, round(h * scale)), max(1, round(w * scale)))
    canvas = np.zeros((28, 28))                                                       # 4)
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return np.round(np.clip(canvas, 0, 255)).astype(np.uint8)
