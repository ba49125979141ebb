"""Run a distributed launcher so that a preemption signal sent to this process reaches every rank.

    python -m megatron_lcot.launcher_supervisor [--after-preemption CMD] [--preempted-status N]
        LAUNCHER [ARG...]

A scheduler stops a job by signalling its main process: Kubernetes sends SIGTERM to the
container's first process, SLURM's `--signal=B:USR1@N` sends SIGUSR1 to the batch script, a
terminal sends SIGINT. The launchers inside handle that badly on their own:

* `deepspeed` (runner): SIGTERM ends it at once (status 143); neither its `launch.py` nor the
  ranks are told, and they train on, orphaned; SIGUSR1 does the same.
* `torchrun`: forwards SIGTERM to its workers (each in its own session), kills them 30 s
  later, and exits 1 with a `SignalException` traceback; SIGUSR1 kills torchrun alone.
* `srun` forwards the signals it receives to its tasks.

This supervisor (every shipped example script runs its launcher through it):

1. starts the launcher as its child in a session of its own (a terminal's Ctrl-C, which signals
   the whole foreground process group, reaches the supervisor alone instead of crashing ranks
   with KeyboardInterrupt), with SIGUSR1 ignored (an ignored disposition survives `exec`; the
   deepspeed runner, its `launch.py` and torchrun keep it, srun replaces it with its forwarding
   handler) and without LOCAL_RANK in its environment, and makes itself the child subreaper
   (Linux `PR_SET_CHILD_SUBREAPER`), so processes the launcher orphans stay its descendants;
2. on SIGTERM, SIGUSR1 or SIGINT sends SIGUSR1, once a second until the launcher has exited,
   to the launcher and to every rank among its descendants: a process whose environment holds
   LOCAL_RANK (every launcher sets it for its ranks) and whose parent's does not (DataLoader
   workers forked by a rank are left alone). Ranks run with `--exit-signal-handler` finish the
   step, save and exit 0 (`training/faults.py`); a rank still starting up ignores the signal
   (inherited) until its handler is installed, and the next one counts. The launcher sees its
   ranks end with status 0 and ends with 0 itself;
3. once the launcher has exited, ends what is left of its descendants (SIGTERM, SIGKILL after
   `--leftover-grace-seconds`) and names them: no process outlives the launcher;
4. exits with the launcher's status (128 + N when signal N ended it), except after a signal
   whose stop went cleanly (the launcher exited 0): then it first runs `--after-preemption` in
   a shell (SLURM: `scontrol requeue`) and exits 128 + the signal's number (`--preempted-status`
   overrides): "interrupted, resumable", the status a shell gives a signalled command and the
   one Kubeflow's `restartPolicy: ExitCode` retries (128-255), where 0 would let a Kubernetes
   Job count a preempted pod as done.

Linux only (/proc, prctl), as the launchers it supervises.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORWARDED_SIGNAL = signal.SIGUSR1
RANK_MARKER = b"LOCAL_RANK="
PR_SET_CHILD_SUBREAPER = 36
RESEND_SECONDS = 1.0
POLL_SECONDS = 0.1


def _say(message: str) -> None:
    print(f"launcher_supervisor: {message}", file=sys.stderr, flush=True)


def _parent_pids() -> dict:
    """{pid: parent pid} of every live (not zombie) process visible in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # the name may hold spaces or ")"
        except OSError:  # ended meanwhile
            continue
        if fields[0] != b"Z":
            parents[int(entry)] = int(fields[1])
    return parents


def descendants(root: int) -> list:
    """Pids of every process below `root`, parents before children."""
    children: dict = {}
    for pid, parent in _parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop(0)
        found.extend(children.get(pid, []))
        frontier.extend(children.get(pid, []))
    return found


def _is_rank(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return any(item.startswith(RANK_MARKER) for item in environ.read().split(b"\0"))
    except OSError:
        return False


def ranks_below(root: int) -> list:
    """The training ranks among `root`'s descendants: processes whose environment holds
    LOCAL_RANK, whose parent's does not."""
    parents = _parent_pids()
    return [pid for pid in descendants(root) if _is_rank(pid) and not _is_rank(parents.get(pid, 0))]


def _signal_all(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


class Supervisor:
    """Owns the launcher child, the stop request and the reaping of orphans (see the module
    docstring for the protocol)."""

    def __init__(
        self,
        command: list,
        after_preemption: str | None,
        leftover_grace_seconds: float,
        preempted_status: int | None,
    ) -> None:
        self.command = command
        self.after_preemption = after_preemption
        self.preempted_status = preempted_status
        self.leftover_grace_seconds = leftover_grace_seconds
        self.stop_signal: int | None = None
        self.stop_time = 0.0

    def _on_stop_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal, self.stop_time = signum, time.monotonic()
            _say(
                f"{signal.Signals(signum).name} received: asking every rank to save and exit "
                f"({FORWARDED_SIGNAL.name}, --exit-signal-handler)"
            )

    def _start(self) -> subprocess.Popen:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        env = {name: value for name, value in os.environ.items() if name != "LOCAL_RANK"}
        launcher = subprocess.Popen(
            self.command,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(FORWARDED_SIGNAL, signal.SIG_IGN),
        )
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)
        return launcher

    def _wait(self, launcher: subprocess.Popen) -> int:
        """Reap children (orphans included) until the launcher has ended; its exit status,
        128 + N for signal N. Forwards a stop request meanwhile."""
        last_sent = -RESEND_SECONDS
        while True:
            while True:  # reap whatever ended; the launcher's status is ours
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid = 0
                if pid == 0:
                    break
                if pid == launcher.pid:
                    launcher.returncode = os.waitstatus_to_exitcode(status)
                    return 128 - launcher.returncode if launcher.returncode < 0 else launcher.returncode
            if self.stop_signal is not None and time.monotonic() - last_sent >= RESEND_SECONDS:
                ranks = ranks_below(os.getpid())
                _signal_all([launcher.pid, *ranks], FORWARDED_SIGNAL)
                if last_sent < 0:
                    _say(
                        f"sent {FORWARDED_SIGNAL.name} to {len(ranks)} rank(s) {ranks} and to the launcher; "
                        f"resending every {RESEND_SECONDS:g} s until it exits"
                    )
                last_sent = time.monotonic()
            time.sleep(POLL_SECONDS)

    def _end_leftovers(self) -> None:
        self._reap_any()
        leftovers = descendants(os.getpid())
        if not leftovers:
            return
        _say(
            f"the launcher exited, leaving {leftovers}: SIGTERM, then SIGKILL after "
            f"{self.leftover_grace_seconds:g} s"
        )
        _signal_all(leftovers, signal.SIGTERM)
        deadline = time.monotonic() + self.leftover_grace_seconds
        while descendants(os.getpid()) and time.monotonic() < deadline:
            self._reap_any()
            time.sleep(POLL_SECONDS)
        _signal_all(descendants(os.getpid()), signal.SIGKILL)
        while True:  # every process left is dead or dying: reap them all, zombies included
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break

    @staticmethod
    def _reap_any() -> None:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass

    def run(self) -> int:
        status = self._wait(self._start())
        self._end_leftovers()
        if self.stop_signal is None:
            return status
        _say(
            f"the launcher exited with status {status}, {time.monotonic() - self.stop_time:.1f} s after "
            f"{signal.Signals(self.stop_signal).name}"
        )
        if status != 0:
            return status
        if self.after_preemption:
            _say(f"running --after-preemption: {self.after_preemption}")
            subprocess.run(self.after_preemption, shell=True, check=False)
        preempted_status = 128 + self.stop_signal if self.preempted_status is None else self.preempted_status
        _say(
            f"exiting {preempted_status}: stopped by {signal.Signals(self.stop_signal).name} after every "
            "rank saved; the same command resumes"
        )
        return preempted_status


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher_supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--after-preemption",
        default=None,
        help="shell command run after a signal, once the launcher exited 0 (e.g. scontrol requeue)",
    )
    parser.add_argument(
        "--preempted-status",
        type=int,
        default=None,
        help="exit status after a signal once the launcher exited 0 (default 128 + the "
        "signal's number; 0 for srun tasks, whose non-zero status would make "
        "srun --kill-on-bad-exit end the other nodes mid-save)",
    )
    parser.add_argument(
        "--leftover-grace-seconds",
        type=float,
        default=10.0,
        help="SIGTERM to SIGKILL delay for processes left behind by the launcher",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher and its arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error(
            "give the launcher command to run, e.g. `torchrun --nproc-per-node 8 pretrain_lcot.py ...`"
        )
    return Supervisor(
        args.command, args.after_preemption, args.leftover_grace_seconds, args.preempted_status
    ).run()


if __name__ == "__main__":
    sys.exit(main())
