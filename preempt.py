"""Stop on SIGTERM or SIGUSR1 (SLURM, Kubernetes, spot instances) after a whole step, at the same step on every
process, so that the checkpoint of that step can be written and the job requeued."""
import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL of sysexits.h, "try again later": a job script requeues on it, never on a crash (status 1)
REQUEUE_STATUS = 75
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
