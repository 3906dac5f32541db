"""Progress lines of the long stages (feature extraction, the linear probe, k-means, kNN, a folder's scan, SeLa's
relabelling): plain lines for a log file, in the style of train.py's step line, from rank 0 alone; and train.py's
OUT/log.jsonl, the same lines as records.
"""
import json
import os
import time


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def fmt_rate(r):
    return f"{r:,.0f}" if r >= 100 else f"{r:.3g}"


class Progress:
    """`NAME 2,560/10,000 img | 850 img/s | eta 0m08s` at most every `every` seconds while the stage runs, and
    `NAME: 10,000 img in 11.8 s (847 img/s)` at close. every: default the environment's PROGRESS_SECONDS, else
    20. Every process may count; only the process of RANK 0 (torchrun's variable; unset: one process) prints."""

    def __init__(self, name, total, unit="img", every=None):
        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self.every = float(os.environ.get("PROGRESS_SECONDS", 20)) if every is None else every
        self.show = os.environ.get("RANK", "0") == "0"
        self.t0 = self.t_line = time.perf_counter()

    def update(self, n=1, info=None):
        """n more done. info: a function that returns the line's own fields ("loss 0.41 | train acc 0.87"),
        called only when a line is due, so a value that costs a device sync or a pass is paid for only then."""
        self.done += n
        now = time.perf_counter()
        if self.show and now - self.t_line >= self.every and self.done < self.total:
            self.t_line = now
            rate = self.done / max(now - self.t0, 1e-9)
            fields = f" | {info()}" if info else ""
            print(f"{self.name} {self.done:,}/{self.total:,} {self.unit}{fields} | {fmt_rate(rate)} {self.unit}/s | "
                  f"eta {fmt_time((self.total - self.done) / rate)}", flush=True)

    def close(self, info=""):
        """The closing line; the stage's seconds."""
        seconds = time.perf_counter() - self.t0
        if self.show:
            took = f"{seconds:.1f} s" if seconds < 60 else fmt_time(seconds)
            done = min(self.done, self.total)  # a share padded to equal length counts past the total
            print(f"{self.name}: {done:,} {self.unit} in {took} ({fmt_rate(done / max(seconds, 1e-9))} "
                  f"{self.unit}/s){' | ' + info if info else ''}", flush=True)
        return seconds


class JsonLog:
    """OUT/log.jsonl: one JSON record a line (log steps, epoch ends, evaluations), each with its step, written by
    rank 0 alone (master); a line cut short by a kill goes at the next trim."""

    def __init__(self, path, master=True):
        self.path, self.master = path, master

    def trim(self, step):
        """Keep the records up to this step (a resume's): those after it are of steps the run does again."""
        if not self.master or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (ValueError, KeyError):  # a line cut short by a kill
                    pass
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def write(self, **record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class CollapseWatch:
    """The collapse banner: head 0 predicting fewer than frac of its classes in the global batch at `logs` log
    steps in a row (a check that assumes classes of about equal size, as the uniform prior does)."""

    def __init__(self, frac, logs, classes, say=print):
        self.frac, self.logs, self.classes, self.say, self.streak = frac, logs, classes, say, 0

    def update(self, used):
        """used: the classes with at least one image in this log step's global batch."""
        self.streak = self.streak + 1 if used < self.frac * self.classes else 0
        if self.streak >= self.logs:
            self.say(f"{'!' * 80}\nCOLLAPSE? head 0 predicts only {used} of {self.classes} classes in the global "
                     f"batch, below {self.frac:.0%} for {self.streak} log steps in a row\n{'!' * 80}")
