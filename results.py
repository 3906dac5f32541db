"""The README's result tables, trained and scored again on this machine, seed by seed, as a user runs them
(train.py, then evaluate.py, per seed), printed as the README prints them: each row over its seeds, as mean +- std
(min-max). Measured on 2 shared cores, 2 runs side by side: synthetic (18 runs) and breaking (15 more) 39 min,
fashion_mnist (6 runs) about 33 min a pair of seeds; folder (3,000 Fashion-MNIST PNGs and scikit-learn's 1,797
digits as PNGs, 5 runs each) trained in 71 min one run after another, beside two other runs. A folder run's
evaluate.py gets its seed too, so the k-means columns spread over k-means seeds as well.

    python results.py synthetic breaking folder
    python results.py fashion_mnist --seeds 2
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("tables", nargs="+", choices=["synthetic", "breaking", "folder", "fashion_mnist"])
parser.add_argument("--seeds", type=int, default=None, help="only the first N seeds of each row")
parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
parser.add_argument("--threads", type=int, default=1, help="compute threads per run (OMP_NUM_THREADS); the README's "
                    "figures are of one thread, and another count rounds differently")
parser.add_argument("--out", default="out/results", help="one folder per run; a run that has its metrics.json is "
                    "reused, so an interrupted command continues where it stopped")
HERE = os.path.dirname(os.path.abspath(__file__))

ROWS = {  # table: (row, dataset, train.py flags, seeds)
    "synthetic": [("Self-Classifier", "synthetic", [], range(8)),
                  ("TWIST", "synthetic", ["--method", "twist"], range(5)),
                  ("SeLa", "synthetic", ["--method", "sela"], range(5))],
    "breaking": [(flag or "(none)", "synthetic", flag.split(), range(5))
                 for flag in ("", "--no_prior", "--col_tau 1.0", "--row_tau 1.0")],
    "folder": [("3,000 Fashion-MNIST PNGs", "folder", ["--data_dir", "fmnist3k", "--workers", "0"], range(5)),
               ("1,797 digits PNGs", "folder", ["--data_dir", "digits", "--workers", "0"], range(5))],
    "fashion_mnist": [("Self-Classifier", "fashion_mnist", [], range(6))],
}


def write_folder(root, images, labels):
    """Pictures as PNGs, one folder per class, made whole under a temporary name so a stopped run leaves none."""
    from PIL import Image
    for i, (x, y) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(root + ".tmp", f"c{y}"), exist_ok=True)
        Image.fromarray(x).save(os.path.join(root + ".tmp", f"c{y}", f"{i:05d}.png"))
    os.replace(root + ".tmp", root)


def folders(out):
    """The README's folder table: the first 3,000 Fashion-MNIST test images; scikit-learn's 8 x 8 digits as 0-255."""
    import data
    if not os.path.isdir(os.path.join(out, "fmnist3k")):
        images, labels = data.load_mnist(data.FASHION_MNIST_DIR, train=False)
        write_folder(os.path.join(out, "fmnist3k"), images[:3000], labels[:3000])
    if not os.path.isdir(os.path.join(out, "digits")):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise SystemExit("the folder table's digits come from scikit-learn: pip install scikit-learn")
        d = load_digits()
        write_folder(os.path.join(out, "digits"), np.round(d.images * 255 / 16).astype(np.uint8), d.target)


def result_run(dataset, flags, seed):
    """train.py then evaluate.py for one seed, in a folder of its own (reused once it has metrics.json); the
    scores, the last log step and whether the collapse banner came up."""
    out = os.path.join(args.out, "-".join([dataset, *(os.path.basename(f.strip("-")) for f in flags), f"s{seed}"]))
    if "--data_dir" in flags:  # a folder made here, below the results
        flags = list(flags)
        flags[flags.index("--data_dir") + 1] = os.path.abspath(os.path.join(args.out, flags[flags.index("--data_dir") + 1]))
    if not os.path.exists(os.path.join(out, "metrics.json")):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train.out"), "w") as log:
            for cmd in ([sys.executable, "train.py", "--dataset", dataset, *flags, "--seed", str(seed), "--out_dir", out],
                        [sys.executable, "evaluate.py", "--ckpt", os.path.join(out, "ckpt.pt"),
                         *(["--seed", str(seed)] if dataset == "folder" else ["--no_figures"])]):
                if subprocess.run(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"failed: {' '.join(cmd)}; its output is in {log.name}")
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    return dict(json.load(open(os.path.join(out, "metrics.json"))), last=steps[-1], seconds=epochs[-1]["time"],
                collapse="COLLAPSE?" in open(os.path.join(out, "train.out")).read(),
                one_class_at=next((r["step"] for r in steps if r["classes"] == 1), None))


def spread(values, digits=3):
    """One cell: the value where every seed gives it (at these digits), else mean +- std (min-max)."""
    v = np.array(values, dtype=float)
    if np.all(np.round(v, digits) == np.round(v[0], digits)):
        return f"{v[0]:.{digits}f} each"
    return f"{v.mean():.{digits}f} +- {v.std(ddof=1):.{digits}f} ({v.min():.{digits}f}-{v.max():.{digits}f})"


def seeds_of(seeds):
    return f"seeds {seeds[0]}-{seeds[-1]}"


def main():
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.time()
    if args.seeds:
        for rows in ROWS.values():
            rows[:] = [(name, dataset, flags, seeds[:args.seeds]) for name, dataset, flags, seeds in rows]
    if "folder" in args.tables:
        folders(args.out)
    runs = {(dataset, tuple(flags), s) for table in args.tables for _, dataset, flags, seeds in ROWS[table] for s in seeds}
    print(f"{len(runs)} runs, {args.jobs} side by side, {args.threads} thread(s) each, in {args.out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own processes: threads only wait for them
        done = dict(zip(sorted(runs), pool.map(lambda r: result_run(r[0], list(r[1]), r[2]), sorted(runs))))
    for table in args.tables:
        print(f"\n{table}, {args.threads} thread(s) per run:\n")
        if table == "breaking":
            print("| flag, seeds | the log (last step) | head 0 ACC | head 0 NMI | kNN top-1 |\n|---|---|---|---|---|")
        else:
            cols = {"folder": ["acc", "nmi", "kmeans_acc", "kmeans_nmi", "kmeans_pixels_acc", "kmeans_pixels_nmi"],
                    "fashion_mnist": ["nmi", "ari", "acc", "knn_top1", "linear_top1"]}.get(table, ["nmi", "ari", "acc", "knn_top1"])
            print(f"| method, seeds | {' | '.join(cols)} |\n|{'---|' * (len(cols) + 1)}")
        for name, dataset, flags, seeds in ROWS[table]:
            rs = [done[dataset, tuple(flags), s] for s in seeds]
            if table == "breaking":
                classes = sorted({r["last"]["classes"] for r in rs})
                log = f"`classes {classes[0]}/10`" if len(classes) == 1 else f"`classes {classes[0]}-{classes[-1]}/10`"
                firsts = [r["one_class_at"] for r in rs]
                if None not in firsts:
                    log += f" from step {min(firsts)}" + (f"-{max(firsts)}" if max(firsts) > min(firsts) else "")
                log += f", loss {spread([r['last']['loss'] for r in rs], 4)}"
                if any(r["collapse"] for r in rs):
                    log += f", `COLLAPSE?` in {sum(r['collapse'] for r in rs)} of {len(rs)}"
                print(f"| {name}, {seeds_of(seeds)} | {log} | {spread([r['acc'] for r in rs])} | "
                      f"{spread([r['nmi'] for r in rs])} | {spread([r['knn_top1'] for r in rs])} |")
            else:
                print(f"| {name}, {seeds_of(seeds)} | " + " | ".join(spread([r[c] for r in rs]) for c in cols) + " |")
        pixels = [done[d, tuple(f), s] for _, d, f, seeds in ROWS[table][:1] for s in seeds[:1]]
        if table == "fashion_mnist" and "kmeans_pixels_acc" in pixels[0]:
            p = pixels[0]
            print(f"| k-means on raw pixels | {p['kmeans_pixels_nmi']:.3f} | {p['kmeans_pixels_ari']:.3f} | "
                  f"{p['kmeans_pixels_acc']:.3f} |" + " |" * (len(cols) - 3))
        secs = [done[d, tuple(f), s]["seconds"] for _, d, f, seeds in ROWS[table] for s in seeds]
        print(f"\ntraining time per run {min(secs):.0f}-{max(secs):.0f} s")
    print(f"\n{len(runs)} runs in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    args = parser.parse_args()
    main()
