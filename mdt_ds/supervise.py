"""``mdt-launch -- LAUNCHER ARGS...``: run torchrun or the deepspeed launcher so that a preempted
run exits 3 and a warning signal reaches the training processes.

    mdt-launch -- torchrun --nproc_per_node=8 -m mdt_ds.train --config run.yaml
    mdt-launch -- deepspeed --num_gpus 8 --module mdt_ds.train --config run.yaml
    python -m mdt_ds.supervise [--grace S] -- LAUNCHER ARGS...

Why a supervisor: torchrun reports any failing worker as exit 1 (so ``mdt-train``'s 3,
"preempted, checkpoint written, requeue me", is lost), SIGUSR1 kills torchrun at once (its
default action; the elastic agent handles only TERM/INT/HUP/QUIT) and leaves its workers, which
run in their own sessions, training unsupervised; SIGTERM makes torchrun (and the deepspeed
launcher's launch.py) kill the workers after a fixed 30 s, possibly in the middle of a checkpoint.

What it does:
- runs the launcher as a child with SIGUSR1/SIGUSR2 ignored (so a signal sent to the whole
  process group or Slurm step does not kill it) and ``MDT_EXIT_DIR`` set to a private folder;
- is a child subreaper (``PR_SET_CHILD_SUBREAPER``): workers orphaned by a dying launcher are
  re-parented to it, stay visible as descendants and are never left running;
- each ``mdt-train`` worker registers its pid there and writes its intended exit status
  (:func:`mdt_ds.preemption.register_worker` / :func:`~mdt_ds.preemption.report_exit`); for 2
  (a user error it printed) and 3 (preempted) it then exits 0 to the launcher, so torchrun and
  the deepspeed launcher print no failure report; a worker still running ``LINGER_S`` after a
  peer reported gets SIGTERM (it would wait for the peer until the process-group timeout);
- SIGUSR1 and SIGUSR2 (Slurm's warnings) are forwarded as SIGUSR1, SIGTERM and a first SIGINT as
  SIGTERM, to the registered workers only (not to the launcher, which would kill them; not to
  data-loader processes, for which SIGUSR1 is fatal). A worker that registers later gets the
  signals sent so far. A second SIGINT goes to the launcher (a hard stop, its own semantics);
- when the launcher has exited, workers still alive get SIGTERM, ``--grace`` seconds to
  checkpoint, then SIGKILL;
- exits 3 if a worker reported 3 and none reported another failure (the ranks agree on a stop
  before any of them exits, so one 3 means the checkpoint is complete); 2 if a worker reported 2
  (a user error it printed in one line) and the others 0 or 1; else the launcher's code (128 + N
  if it died of signal N).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mdt_ds.clihelp import HelpFormatter
from mdt_ds.preemption import EXIT_DIR_VAR

EXIT_PREEMPTED = 3
EXIT_USAGE = 2  # mdt-train: a user error it named in one line
LINGER_S = 60.0  # see Supervisor.stop_lingering
PR_SET_CHILD_SUBREAPER = 36
FORWARD = {
    signal.SIGUSR1: signal.SIGUSR1,
    signal.SIGUSR2: signal.SIGUSR1,
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGINT: signal.SIGTERM,
}
POLL_S = 0.2


def say(message: str) -> None:
    print(f"[mdt-launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux >= 3.4)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # the comm field may hold spaces and ")"


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (from /proc: sessions and process groups do not matter)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = parent_of(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


class Supervisor:
    """One launcher run; see the module docstring."""

    def __init__(self, command: list[str], grace_s: float = 300.0) -> None:
        self.command = command
        self.grace_s = grace_s
        self.exit_dir = Path(tempfile.mkdtemp(prefix="mdt-exit-"))
        self.received: list[int] = []  # forwarded signal numbers, in order
        self.delivered: dict[int, int] = {}  # worker pid -> how many of ``received`` it got
        self.interrupts = 0
        self.child: subprocess.Popen | None = None

    # -- signals
    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1 and self.child is not None and self.child.poll() is None:
                say("second SIGINT: interrupting the launcher")
                with contextlib.suppress(ProcessLookupError):
                    self.child.send_signal(signal.SIGINT)
                return
        self.received.append(FORWARD[signal.Signals(signum)])

    def workers(self) -> list[int]:
        """Registered worker pids that are still our live descendants (guards against pid reuse)."""
        below = descendants(os.getpid())
        pids = []
        for path in self.exit_dir.glob("pid.*"):
            pid = int(path.name.split(".", 1)[1])
            if pid in below and not is_zombie(pid):
                pids.append(pid)
        return sorted(pids)

    def deliver(self) -> None:
        if not self.received:
            return
        for pid in self.workers():
            for sig in self.received[self.delivered.get(pid, 0) :]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                say(f"forwarded {signal.Signals(sig).name} to worker {pid}")
            self.delivered[pid] = len(self.received)

    def reap_orphans(self) -> None:
        """Collect re-parented descendants that exited (we are their subreaper)."""
        launcher = self.child.pid if self.child else -1
        for pid in descendants(os.getpid()):
            if pid != launcher and parent_of(pid) == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    # -- run
    def run(self) -> int:
        handled = list(FORWARD)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        subreaper = become_subreaper()
        try:
            env = {**os.environ, EXIT_DIR_VAR: str(self.exit_dir)}

            def ignore_warnings() -> None:  # in the child, before exec: SIG_IGN survives exec
                for sig in (signal.SIGUSR1, signal.SIGUSR2):
                    signal.signal(sig, signal.SIG_IGN)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)

            try:
                self.child = subprocess.Popen(self.command, env=env, preexec_fn=ignore_warnings)
            except OSError as err:
                say(f"cannot start {self.command[0]}: {err}")
                return 127
            first_report: float | None = None
            while self.child.poll() is None:
                self.deliver()
                self.reap_orphans()
                first_report = first_report or (time.monotonic() if self.reported() else None)
                if first_report and time.monotonic() - first_report > LINGER_S:
                    self.stop_lingering()
                    first_report = math.inf
                time.sleep(POLL_S)
            self.deliver()
            rc = self.child.returncode
            self.finish_leftovers(subreaper)
            return self.exit_code(rc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.exit_dir, ignore_errors=True)

    def stop_lingering(self) -> None:
        """A worker exited with a reported code (workers exit 0 to the launcher then, see
        mdt_ds.train.main) but others still run: they meet the same stop at the same point, so one
        still running LINGER_S later waits for a peer that is gone. SIGTERM them."""
        left = [pid for pid in self.workers() if not (self.exit_dir / f"exit.{pid}").exists()]
        if left:
            say(f"worker(s) {left} still running {LINGER_S:.0f} s after another reported its exit: SIGTERM")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def finish_leftovers(self, subreaper: bool) -> None:
        """The launcher is gone; its workers must not outlive this process."""
        left = descendants(os.getpid()) if subreaper else set(self.workers())
        left = {pid for pid in left if not is_zombie(pid)}
        if not left:
            self.reap_orphans()
            return
        say(f"launcher exited with {len(left)} process(es) still running: SIGTERM, {self.grace_s:.0f} s to stop")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            self.reap_orphans()
            if not any(not is_zombie(pid) for pid in descendants(os.getpid())):
                return
            time.sleep(POLL_S)
        for pid in descendants(os.getpid()):
            say(f"process {pid} did not stop in {self.grace_s:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_S)
        self.reap_orphans()

    def reported(self) -> list[int]:
        codes = []
        for path in self.exit_dir.glob("exit.*"):
            with contextlib.suppress(OSError, ValueError):
                codes.append(int(path.read_text().strip()))
        return codes

    def exit_code(self, launcher_rc: int) -> int:
        codes = self.reported()
        rc = 128 - launcher_rc if launcher_rc < 0 else launcher_rc
        if EXIT_PREEMPTED in codes and all(c in (0, EXIT_PREEMPTED) for c in codes):
            say(f"workers stopped for preemption after checkpointing (launcher exit {rc}): exit {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED
        if EXIT_USAGE in codes and set(codes) <= {0, 1, EXIT_USAGE}:
            # A user error (config, data, a refused file): the worker printed it in one line; the
            # others, stopped by the launcher, may say 1. torchrun itself would say 1.
            say(f"a worker stopped on an error it named above (launcher exit {rc}): exit {EXIT_USAGE}")
            return EXIT_USAGE
        say(f"launcher exited with {rc}; workers reported {sorted(codes) or 'nothing'}")
        return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mdt-launch",
        usage="%(prog)s [-h] [--grace GRACE] -- LAUNCHER ARGS...",
        formatter_class=HelpFormatter,
        description="Run a launcher (torchrun, deepspeed) so that preemption exits 3 and "
        "warning signals reach the training processes. Usage: mdt-launch [--grace S] -- LAUNCHER ARGS...",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=300.0,
        help="seconds workers left behind by the launcher get to checkpoint before SIGKILL",
    )
    if "--" in argv:
        split = argv.index("--")
        args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    else:
        args, command = parser.parse_known_args(argv)
    if not command:
        parser.error("no launcher command given (mdt-launch -- torchrun ...)")
    return Supervisor(command, grace_s=args.grace).run()


if __name__ == "__main__":
    sys.exit(main())
