"""Reports: confusions, mistakes and filters in the terminal, the history CSV, the plot."""
import numpy as np

SHADES = " .:-=+*#%@"
DIGITS = tuple("0123456789")      # MNIST's class names: each digit names itself
WIDTH = 100                       # no printed line is wider


def wrapped(head, items, sep, width=WIDTH):
    """head + items joined by sep, on as few lines of at most `width` columns as it takes, the
    items shared out evenly (10 per-class figures: 5 and 5, not 8 and 2); the lines after the first
    indented under the first item, and all but the last ending in sep's mark (a comma, if any)."""
    items, mark = list(items), sep.rstrip()
    for rows in range(1, len(items) + 1):
        per_row = -(-len(items) // rows)
        chunks = [items[i:i + per_row] for i in range(0, len(items), per_row)]
        lines = [(" " * len(head) if k else head) + sep.join(chunk) + (mark if k < len(chunks) - 1 else "")
                 for k, chunk in enumerate(chunks)]
        if max(len(line) for line in lines) <= width:
            break
    return lines


def confusion_matrix(pred, labels, classes=10):
    """counts[true, predicted]."""
    counts = np.zeros((classes, classes), np.int64)
    np.add.at(counts, (labels.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


def most_confused(counts, top=5):
    """[(true, predicted, count)] of the largest off-diagonal entries of counts[true, predicted]."""
    pairs = [(int(counts[t, p]), t, p) for t in range(10) for p in range(10) if t != p and counts[t, p]]
    return [(t, p, c) for c, t, p in sorted(pairs, key=lambda e: (-e[0], e[1], e[2]))[:top]]


def confusion_report(counts, classes=DIGITS):
    """Lines: per-class accuracy, the confusion matrix and the most confused pairs, by class name."""
    per_class = counts.diagonal() / counts.sum(axis=1).clip(min=1)
    figures = [f"{name}:{100 * a:.1f}%" for name, a in zip(classes, per_class)]
    lines = wrapped("per-class accuracy: ", figures, "  ")
    if tuple(classes) == DIGITS:
        lines += ["confusion matrix (rows: actual 0-9, columns: predicted 0-9)",
                  "      " + "".join(f"{d:6d}" for d in range(10))]
        lines += [f"{t:6d}" + "".join(f"{c:6d}" for c in row) for t, row in enumerate(counts)]
    else:                       # names head the rows; the columns, too narrow for them, are numbered
        rows = [f"{t} {name}" for t, name in enumerate(classes)]
        width = max(len(r) for r in rows) + 1
        lines += ["confusion matrix (rows: actual, columns: predicted, numbered as the rows)",
                  " " * width + "".join(f"{d:6d}" for d in range(len(classes)))]
        lines += [r.ljust(width) + "".join(f"{c:6d}" for c in row) for r, row in zip(rows, counts)]
    pairs = most_confused(counts)
    if pairs:
        lines += wrapped("most confused: ", [f"{classes[t]} taken for {classes[p]} {c}x" for t, p, c in pairs], ", ")
    return lines


def ascii_digit(image):
    """A 28x28 uint8 image as 28 lines of 56 characters (2 per pixel, so it looks square)."""
    levels = (image.astype(int) * len(SHADES)) // 256
    return ["".join(SHADES[v] * 2 for v in row) for row in levels]


def show_mistakes(images, labels, pred, probs, n, out=print, classes=DIGITS):
    """Draw the first n misclassified images with their prediction, truth and confidence."""
    wrong = np.flatnonzero(pred != labels)[:n]
    if len(wrong) == 0:
        out("no misclassified test images to show")
    for i in wrong:
        out(f"test image {i}: predicted {classes[pred[i]]} (p={probs[i, pred[i]]:.2f}), "
            f"actually {classes[labels[i]]} (p={probs[i, labels[i]]:.2f})")
        for line in ascii_digit(images[i]):
            out("  " + line.rstrip() if line.strip() else "")
    return len(wrong)


def filter_cells(w, scale):
    """One 3x3 filter as 3 lines of signed cells: '+++' strongly positive ... '---' strongly negative."""
    lines = []
    for row in w:
        cells = []
        for v in row:
            k = min(3, int(round(3 * abs(v) / scale)))
            cells.append(((("+" if v > 0 else "-") * k) or ".").center(3))
        lines.append(" ".join(cells))
    return lines


def show_filters(conv_weight, out=print):
    """Every conv filter side by side, as signed marks scaled to the largest weight."""
    scale = float(np.abs(conv_weight).max()) or 1.0
    drawn = [filter_cells(w[0], scale) for w in conv_weight]
    out(f"conv filters ('+++'/'---' = +/-{scale:.2f}, '.' = near 0):")
    for start in range(0, len(drawn), 6):
        group = drawn[start:start + 6]
        out("   ".join(f"filter {start + i:<4d}" for i in range(len(group))))
        for r in range(3):
            out("   ".join(f"{g[r]:11s}" for g in group))


def write_history(path, history, write_atomically):
    """Per-epoch rows: epoch, loss, train accuracy, test accuracy, seconds (CSV)."""
    lines = ["epoch,loss,train_accuracy,test_accuracy,seconds"]
    lines += [f"{h['epoch']},{h['loss']:.6f},{h['train_accuracy']:.6f},{h['test_accuracy']:.6f},"
              f"{h['seconds']:.3f}" for h in history]
    write_atomically(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def plot(path, history, conv_weight, images, labels, pred, probs, write_atomically, out=print,
         classes=DIGITS):
    """One PNG: loss and accuracy per epoch, the filters, a grid of mistakes.  Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out(f"--plot {path}: skipped, matplotlib is not installed (pip install matplotlib)")
        return False
    fig = plt.figure(figsize=(12, 8), constrained_layout=True)
    grid = fig.add_gridspec(3, 8)
    if history:
        epochs = [h["epoch"] for h in history]
        ax = fig.add_subplot(grid[0, :4])
        ax.plot(epochs, [h["loss"] for h in history], "o-")
        ax.set(title="training loss (mean over each epoch)", xlabel="epoch", ylabel="loss")
        ax.set_xticks(epochs)
        ax = fig.add_subplot(grid[0, 4:])
        ax.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="training")
        ax.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
        ax.set(title="accuracy", xlabel="epoch", ylabel="%")
        ax.set_xticks(epochs)
        ax.legend()
    scale = float(np.abs(conv_weight).max()) or 1.0
    for i, w in enumerate(conv_weight[:8]):
        ax = fig.add_subplot(grid[1, i])
        ax.imshow(w[0], cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set_title(f"filter {i}", fontsize=9)
        ax.axis("off")
    wrong = np.flatnonzero(pred != labels)[:8]
    gap = " " if max(len(name) for name in classes) <= 2 else "\n"   # long names: one per line
    for j, i in enumerate(wrong):
        ax = fig.add_subplot(grid[2, j])
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"{classes[labels[i]]}{gap}read as {classes[pred[i]]}\np={probs[i, pred[i]]:.2f}",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle(f"mnist_net: test accuracy {100 * float((pred == labels).mean()):.2f}%; "
                 "filters (red +, blue -); mistakes (truth read as prediction)")
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True

