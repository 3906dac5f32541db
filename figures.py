"""The figures and tables evaluate.py writes: training curves, confusion matrix, sheets of each class's pictures,
clusters.csv. Arrays in, a file out; each plot also returns its matplotlib figure. No torch import: evaluate.py
--curves_only draws curves.png without it.
"""
import csv
import json
import os

import numpy as np


def read_log(path):
    """The records of train.py's log.jsonl, skipping a line cut short by a kill; records written before the
    log had kinds are epoch records."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append({"kind": "epoch", **json.loads(line)})
            except ValueError:
                pass
    return records


def plot_curves(log_path, path, num_classes=None):
    """Per log step: loss, learning rate, images/s, and head 0's classes used and balance (entropy of its class
    sizes / log C) over the global batch; per evaluation (--eval_every): head 0's clustering metrics, classes used
    and balance on the evaluation split. Dotted lines end epochs; dashed lines mark the ceilings, num_classes
    (head 0's size) and balance 1. Classes used and balance near their maximum are healthy only where the
    classes are of about equal size, as the uniform prior assumes."""
    import matplotlib.pyplot as plt
    log = read_log(log_path)
    steps = [r for r in log if r["kind"] == "step"] or [r for r in log if r["kind"] == "epoch"]  # older logs
    evals = [r for r in log if r["kind"] == "eval"]
    ends = [r["step"] for r in log if r["kind"] == "epoch"]
    panels = [("loss", "loss", "loss"), ("lr", "learning rate", "learning rate"), ("img_s", "images / s", "images / s"),
              ("classes", "classes used by head 0", "classes"), ("balance", "balance of head 0 (1: classes equal)",
                                                                 "entropy / log C")]
    panels = [p for p in panels if any(p[0] in r for r in steps)]
    scores = [k for k in ("nmi", "ami", "ari", "acc") if any(k in r for r in evals)]
    n = len(panels) + bool(scores)
    cols = min(3, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.6 * cols, 2.8 * -(-n // cols)), squeeze=False)
    axes = list(axes.flat)
    for ax, (k, title, ylabel) in zip(axes, panels):
        pts = [(r["step"], r[k]) for r in steps if k in r]
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, ms=3, label="training batches")
        if k in ("classes", "balance") and evals:
            ax.plot([r["step"] for r in evals], [r[k] for r in evals], "o", ms=4, label="evaluation split")
        ceiling = {"classes": num_classes, "balance": 1}.get(k)
        if ceiling:
            ax.axhline(ceiling, color="tab:red", ls="--", lw=0.8, label=f"{ceiling} (the most)")
        if k in ("classes", "balance"):
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        if k == "classes":
            ax.set_ylim(bottom=0)
    if scores:
        ax = axes[len(panels)]
        for k in scores:
            ax.plot(*zip(*[(r["step"], r[k]) for r in evals if k in r]), marker="o", ms=3, label=k.upper())
        ax.set_title("head 0 on the evaluation split", fontsize=10)
        ax.set_ylabel("score (1: the true classes)", fontsize=8)
        ax.legend(fontsize=7)
    stride = -(-len(ends) // 20)  # at most about 20 epoch lines
    last = max(r["step"] for r in log)
    for ax in axes[:n]:
        ax.set_xlim(0, last * 1.03)
        for s in ends[stride - 1::stride]:
            ax.axvline(s, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("step (dotted: epoch ends)", fontsize=8)
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    return save(fig, path)


def plot_k_estimate(criteria, k, path, head_size=None, true_k=None):
    """evaluate.py --estimate_k's criteria over the number of classes K ({K: (agreement, silhouette)}): the
    agreement of k-means starts, the silhouette, and their product, whose highest point is the estimate; where
    known, the head the checkpoint was trained with and the number of true classes."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ks = sorted(criteria)
    for i, label in ((0, "agreement of k-means starts (ARI)"), (1, "silhouette")):
        ax.plot(ks, [criteria[c][i] for c in ks], marker="o", ms=3, lw=1, label=label)
    ax.plot(ks, [criteria[c][0] * criteria[c][1] for c in ks], marker="o", ms=4, color="black", label="product")
    ax.axvline(k, color="tab:red", lw=1, label=f"estimate: {k}")
    if head_size:
        ax.axvline(head_size, color="tab:gray", ls=":", lw=1, label=f"head 0 trained with {head_size}")
    if true_k:
        ax.axvline(true_k, color="tab:green", ls="--", lw=1, label=f"true classes: {true_k}")
    ax.set_xlabel("number of classes K")
    ax.set_ylim(min(0, min(min(v) for v in criteria.values())), 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def save(fig, path, dpi=110):
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=dpi)
    plt.close(fig)  # out of pyplot's list; the figure itself stays readable for whoever holds it
    return fig


def show_image(ds, i, mean, std):
    # the evaluation crop of picture i, un-normalised, as an (H, W[, 3]) array in [0, 1]
    x = np.asarray(ds[i][0], dtype=np.float32)
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    x = x.clip(0, 1).transpose(1, 2, 0)
    return x[..., 0] if x.shape[-1] == 1 else x


def class_title(c, members, y, names):
    """"class 3: 120 imgs", and where labelled its purity: the share of its largest true class, and which."""
    title = f"class {c}: {len(members)} imgs"
    if len(y) and (y >= 0).all():  # an unlabelled folder has no true class to show
        majority = np.bincount(y[members]).argmax()
        title += f", {(y[members] == majority).mean():.0%} true class {names[majority] if names else majority}"
    return title


def pick(members, conf, c, k):
    """The k most confident members of class c, and k others drawn at random (seed: the class id), so that a
    class which merged several true classes shows them even when its most confident pictures are alike."""
    best = members[np.argsort(-conf[members], kind="stable")][:k]
    rest = np.setdiff1d(members, best)
    sample = np.sort(np.random.default_rng(c).choice(rest, min(k, len(rest)), replace=False))
    return best, sample


def draw(axes, left, right, half, ds, mean, std):
    # one row of a sheet: up to half pictures, a blank gap, up to half others
    cells = [*left, *[None] * (half - len(left)), None, *right, *[None] * (half - len(right))]
    for ax, i in zip(axes, cells):
        ax.axis("off")
        if i is not None:
            ax.imshow(show_image(ds, i, mean, std), cmap="gray", vmin=0, vmax=1)


def plot_examples(ds, pred, conf, y, path, mean, std, num_classes, rows=20, cols=10, names=None):
    """Per predicted class (the largest classes first if there are many), one row: its cols // 2 most confident
    evaluation pictures, then cols // 2 others at random; titled with its size and, where labelled, purity."""
    import matplotlib.pyplot as plt
    sizes = np.bincount(pred, minlength=num_classes)
    classes = sizes.argsort()[::-1][:rows]
    classes = np.sort(classes[sizes[classes] > 0])
    half = cols // 2
    fig, axes = plt.subplots(len(classes), 2 * half + 1, figsize=((2 * half + 1) * 0.9, len(classes) * 0.95 + 0.3),
                             squeeze=False, gridspec_kw=dict(width_ratios=[1] * half + [0.25] + [1] * half))
    for r, c in enumerate(classes):
        members = np.flatnonzero(pred == c)
        best, sample = pick(members, conf, c, half)
        draw(axes[r], best, sample, half, ds, mean, std)
        axes[r][0].set_title(class_title(c, members, y, names), fontsize=7, loc="left")
    fig.suptitle("each class: its most confident pictures | others at random", fontsize=8)
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.2 / fig.get_figheight()))
    return save(fig, path)


def plot_confusion(y, pred, path, names=None):
    """Row-normalised confusion matrix: predicted classes in the order of their Hungarian match (the diagonal
    shows the matched pairs), labelled with their own class ids, as clusters.csv and the class sheets name them."""
    import matplotlib.pyplot as plt
    from scipy.optimize import linear_sum_assignment
    ys, yi = np.unique(y, return_inverse=True)
    ps, pi = np.unique(pred, return_inverse=True)
    M = np.zeros((len(ys), len(ps)))
    np.add.at(M, (yi, pi), 1)
    rows, cols = linear_sum_assignment(M, maximize=True)
    order = list(cols[np.argsort(rows)]) + [j for j in range(len(ps)) if j not in set(cols)]
    M = M[:, order] / M.sum(1, keepdims=True)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xlabel("predicted class (in matched order)")
    ax.set_ylabel("true class")
    step = -(-len(ps) // 40)  # at most about 40 labels, else they overlap
    ax.set_xticks(range(0, len(ps), step), [str(ps[order[j]]) for j in range(0, len(ps), step)], fontsize=7,
                  rotation=90 if len(ps) > 20 else 0)
    step = -(-len(ys) // 40)
    ax.set_yticks(range(0, len(ys), step), [names[c] if names else str(c) for c in ys[::step]], fontsize=7)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    return save(fig, path)


def plot_class_sheets(ds, pred, conf, y, out_dir, mean, std, num_classes, names=None, one_sheet_max=20, side=8):
    """The pictures of every class: one sheet, clusters.png, for up to one_sheet_max classes in use, else
    clusters/class_007.png per class: its side x side/2 most confident pictures beside as many at random,
    titled with its size and, where labelled, purity. The figure, or the list of figures."""
    import matplotlib.pyplot as plt
    used = np.unique(pred)
    if len(used) <= one_sheet_max:
        return plot_examples(ds, pred, conf, y, os.path.join(out_dir, "clusters.png"), mean, std, num_classes,
                             rows=one_sheet_max, names=names)
    os.makedirs(os.path.join(out_dir, "clusters"), exist_ok=True)
    half, figs = side // 2, []
    for c in used:
        members = np.flatnonzero(pred == c)
        best, sample = pick(members, conf, c, side * half)
        rows = -(-max(len(best), len(sample)) // half)
        fig, axes = plt.subplots(rows, side + 1, figsize=((side + 1) * 0.9, rows * 0.9 + 0.6), squeeze=False,
                                 gridspec_kw=dict(width_ratios=[1] * half + [0.25] + [1] * half))
        for r in range(rows):
            draw(axes[r], best[r * half:(r + 1) * half], sample[r * half:(r + 1) * half], half, ds, mean, std)
        shown = (f"left: the {len(best)} most confident; right: {len(sample)} others at random" if len(sample) else
                 f"all {len(best)}, the most confident first")
        fig.suptitle(f"{class_title(c, members, y, names)}\n{shown}", fontsize=8)
        fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # the title's two lines kept clear
        figs.append(save(fig, os.path.join(out_dir, "clusters", f"class_{c:03d}.png"), dpi=80))
    return figs


def write_clusters(ds, pred, conf, path, data_dir):
    """One row per picture of a folder: its path below data_dir, its class, the class's probability and, where
    the folder is labelled, its true class (the name of its sub-folder)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "confidence"] + (["true_class"] if ds.classes else []))
        for i in range(len(ds)):
            row = [os.path.relpath(ds.path(i), data_dir).replace(os.sep, "/"), int(pred[i]), f"{conf[i]:.4f}"]
            w.writerow(row + ([ds.classes[ds.labels[i]]] if ds.classes else []))
