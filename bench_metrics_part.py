"""Benchmark: metrics.cluster_metrics (NMI, AMI, ARI and ACC) against sklearn's NMI + AMI + ARI."""
import time

import numpy as np

from metrics import cluster_metrics


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_metrics(n=50000, k=1000, repeats=3, seed=0):
    """Median seconds of cluster_metrics vs sklearn's nmi + ami + ari on two label sets of n samples
    and k classes: independent random labels, and a noisy clustering (30% of the samples reassigned
    at random, then cluster ids permuted). Returns {case: (ours_s, sklearn_s, sklearn_s / ours_s)}."""
    from sklearn.metrics import (adjusted_mutual_info_score, adjusted_rand_score,
                                 normalized_mutual_info_score)
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    noisy = y_true.copy()
    flip = rng.random(n) < 0.3
    noisy[flip] = rng.integers(0, k, int(flip.sum()))
    noisy = rng.permutation(k)[noisy]
    cases = {"random": (y_true, rng.integers(0, k, n)), "noisy": (y_true, noisy)}

    def sk(yt, yp):
        return (normalized_mutual_info_score(yt, yp), adjusted_mutual_info_score(yt, yp),
                adjusted_rand_score(yt, yp))

    out = {}
    for name, (yt, yp) in cases.items():
        ours = _median_time(lambda: cluster_metrics(yt, yp), repeats)
        ref = _median_time(lambda: sk(yt, yp), repeats)
        out[name] = (ours, ref, ref / ours)
        print(f"metrics n={n} k={k} {name:6s}: cluster_metrics {ours * 1e3:8.1f} ms | "
              f"sklearn nmi+ami+ari {ref * 1e3:8.1f} ms | x{ref / ours:.1f}")
    return out


if __name__ == "__main__":
    bench_metrics()
