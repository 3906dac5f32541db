"""Stop on SIGTERM or SIGUSR1 (SLURM, Kubernetes, spot instances) after a whole step, at the same step on every
process, so that the checkpoint of that step can be written and the job requeued; process groups that a
restart by torchrun --max_restarts can create again (docs/experiments.md, "a restart after a crash"); and the
out dir's lock, so that one run at a time writes there."""
import datetime
import errno
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

# EX_TEMPFAIL of sysexits.h, "try again later": a job script requeues on it, never on a crash (status 1)
REQUEUE_STATUS = 75
# EX_IOERR: a checkpoint could not be written (a full disk, a quota); the last one written is intact
SAVE_FAILED_STATUS = 74
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """The handlers only note the signal; poll(), called once per step by every process, turns True at the
    same step on every process. Each step all-reduces (MAX) the signal number over a CPU (gloo) group: started
    at one step and read at the next, so no step waits on the network or the GPU, and a signal that reaches
    one process stops them all one step after the step in flight. With one process, right after it."""

    def __init__(self, group=None):
        self.group = group  # a gloo group spanning every process, or None for one process
        self.received = 0  # the signal this process got (0: none)
        self.agreed = 0  # the signal every process acts on, the same everywhere once set
        self._max, self._work = None, None
        for s in SIGNALS:
            signal.signal(s, self._note)

    def _note(self, signum, frame):
        # raising here could cut a save in half: a second signal (torchrun forwards the one it got) changes nothing
        self.received = self.received or signum

    @property
    def name(self):
        return signal.Signals(self.agreed).name

    def poll(self):
        if self.group is None:
            self.agreed = self.received
        elif not self.agreed:
            if self._work is not None:
                self._work.wait()
                self.agreed = int(self._max)
            if not self.agreed:
                self._max = torch.tensor(self.received)
                self._work = dist.all_reduce(self._max, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if self.agreed:
            # stopping now: Python's exit would restore the default action, and a late signal would kill the process
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        return bool(self.agreed)

    def close(self):
        # the last step's all-reduce is still out: every process waits it before the group goes away
        if self._work is not None:
            self._work.wait()


def init_process_group(backend, timeout):
    """dist.init_process_group from torchrun's environment, in a namespace of the store that no earlier attempt
    wrote to, every wait bounded by timeout (a timedelta). Groups are named by a per-process counter, so their
    keys are the same in every attempt; torchrun keeps one store across restarts, where an earlier attempt's
    peer addresses would be read as this one's."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    prefix = f"attempt{attempt_number(store, rank, world_size, timeout)}/"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                            timeout=timeout)


def attempt_number(store, rank, world_size, timeout):
    """A number the same on every process and new to the store. Rank 0 draws it (add is atomic); another rank
    may read an earlier attempt's number first, so it leaves a nonce under the number it read and waits for
    rank 0 to echo it. TORCHELASTIC_RESTART_COUNT would not do: each node's agent counts its own restarts."""
    if rank == 0:
        n = store.add("attempts", 1)
        store.set("attempt", str(n))
        joins = [f"attempt{n}/join{r}" for r in range(1, world_size)]
        store.wait(joins, timeout)
        for key in joins:
            store.set(f"attempt{n}/welcome{store.get(key).decode()}", "")
        return n
    nonce = os.urandom(8).hex()
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        n = int(store.get("attempt"))  # the first attempt: waits for rank 0 to set it
        store.set(f"attempt{n}/join{rank}", nonce)
        try:
            store.wait([f"attempt{n}/welcome{nonce}"], datetime.timedelta(seconds=0.5))
            return n
        except dist.DistStoreError:  # an earlier attempt's number, or rank 0 still waits for other ranks
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"rank 0 did not answer rank {rank} within {timeout}") from None


def exit_process(status=0):
    """End a process of a distributed job once its work is saved, without Python's teardown: a gloo thread
    can still be freeing the last collective's tensors, which needs the interpreter that the teardown takes
    apart, and aborts the process (SIGABRT, "terminate called without an active exception"; docs/experiments.md,
    "an abort at the end of a run"). The data-loading workers are ended first, as the teardown would."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would report its own workers' end
    workers = multiprocessing.active_children()
    for p in workers:
        p.terminate()
    for p in workers:
        p.join(5)
    os._exit(status)


class OutDirLock:
    """OUT/run.lock, held by rank 0 for the run's life with a POSIX lock (fcntl.lockf). The kernel releases it
    when the process ends, however it ends, and the data-loading workers it forks do not hold it. The file names
    the holder (host, process id, since when); a holder killed before it could release the lock leaves its
    name behind, which the next run reports as it takes over. Call acquire(), then read its outcome:
    busy (the holder's description: another run has the folder), unsupported (the file system's error: it
    keeps no locks, the run goes on without one), stale (the name left behind by a holder that is gone)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "run.lock")
        self.busy = self.unsupported = self.stale = None
        self._file = None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: a file system without locks
                self.unsupported = f"{e.strerror} (errno {errno.errorcode.get(e.errno, e.errno)})"
            else:
                f.seek(0)
                self.busy = describe_holder(f.read()) or "a run that is starting (it has not named itself yet)"
            f.close()
            return self
        f.seek(0)
        self.stale = describe_holder(f.read())
        f.truncate(0)
        f.write(json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                                since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self):
        # an empty file: the next run finds no name, so it has nothing to report as taken over
        if self._file is not None:
            self._file.truncate(0)
            self._file.close()
            self._file = None


def describe_holder(text):
    try:
        h = json.loads(text)
        return f"host {h['host']}, process {h['pid']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):  # empty: released, or its holder had not yet written its name
        return None


def hold_out_dir(out_dir, ckpt_path, ckpt_seen, master=True, distributed=False):
    """One run per out dir: rank 0 takes OUT/run.lock (OutDirLock) and every process follows its verdict. A
    busy folder, one that cannot be written, or a ckpt.pt that another run rewrote since ckpt_seen (its os.stat
    when the flags were completed, None where there was none) stops every process with one line. Returns the
    lock, held by rank 0 until release() (or the end of the process)."""
    lock, refusal = OutDirLock(out_dir), None
    if master:
        try:
            lock.acquire()
        except OSError as e:
            refusal = f"--out_dir {out_dir}: cannot write there ({e.strerror or e})"
        if lock.busy:
            refusal = (f"{out_dir} is in use by another run: {lock.busy} (it holds {lock.path}). Wait for it to "
                       f"end or stop it, or give this run another --out_dir")
        now = os.stat(ckpt_path) if os.path.exists(ckpt_path) else None
        if not refusal and (now and (now.st_mtime_ns, now.st_size, now.st_ino)) != \
                (ckpt_seen and (ckpt_seen.st_mtime_ns, ckpt_seen.st_size, ckpt_seen.st_ino)):
            refusal = (f"{ckpt_path} was written by another run while this one started (that run has ended); the "
                       f"same command again resumes from it")
        if lock.unsupported:
            print(f"warning: {lock.path}: the file system keeps no locks ({lock.unsupported}); nothing stops a "
                  f"second run from writing to {out_dir} too", flush=True)
        elif lock.stale and not refusal:
            print(f"{lock.path}: taking over from {lock.stale}, which is gone", flush=True)
    if distributed:
        verdict = [refusal]
        dist.broadcast_object_list(verdict, 0)
        refusal = verdict[0]
    if refusal:
        raise SystemExit(refusal if master else 1)
    return lock


def report_failures(where, dist_timeout_min):
    """A process's uncaught exception: its traceback, then one line naming the rank and where() it stopped
    (torchrun puts every process's traceback in one log), with --dist_timeout where it waited for the others."""
    def hook(kind, e, tb):
        sys.__excepthook__(kind, e, tb)
        waited = isinstance(e, dist.DistError) or "Timed out" in str(e)  # gloo's timeouts are plain RuntimeErrors
        first = (str(e).splitlines() or [""])[0]
        print(f"rank {os.environ.get('RANK', 0)} stopped {where()}: {kind.__name__}: {first}"
              + (f" (--dist_timeout {dist_timeout_min:g} min)" if waited else ""), file=sys.stderr, flush=True)
    sys.excepthook = hook


def end_process(status, lock, distributed=False):
    """A run's end with this status once its work is saved, OUT/run.lock released first: exit_process for a
    process of a distributed job, else SystemExit (which runs Python's teardown as usual)."""
    lock.release()
    if distributed:
        exit_process(status)
    raise SystemExit(status)
