"""Preemption through the launchers: SIGUSR1 to ``mdt-launch -- torchrun|deepspeed ...`` after the
first step ends in exit 3, a complete checkpoint and no process left alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mdt_ds.dist import free_port
from mdt_ds.supervise import descendants
from tests.conftest import PYTHON, REPO, TINY_RUN, subprocess_env

pytestmark = pytest.mark.trainer

TINY = [*TINY_RUN, "precision=fp32", "zero_stage=1", "steps=100000", "ckpt_every=100000"]


def torchrun_launcher() -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "mdt_ds.train"]


def child_env() -> dict[str, str]:
    return subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data"))


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def steps_logged(run_dir: Path) -> int:
    stats = run_dir / "stats.jsonl"
    return len(stats.read_text().splitlines()) if stats.is_file() else 0


def preempt_through(
    launcher: list[str],
    run_dir: Path,
    sig: int = signal.SIGUSR1,
    target: str = "supervisor",
    timeout_s: float = 150,
    supervised: bool = True,
) -> tuple[int, str, set[int]]:
    """Start ``mdt-launch -- LAUNCHER mdt_ds.train ...`` (or the bare launcher), send ``sig`` once a
    step is logged, and return (exit code, output, every process seen below the started one)
    once all of those have ended."""
    wrap = [PYTHON, "-m", "mdt_ds.supervise", "--grace", "30", "--"] if supervised else []
    cmd = [*wrap, *launcher, *TINY, f"run_dir={run_dir}"]
    log = run_dir.parent / f"{run_dir.name}.log"
    seen: set[int] = set()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout_s
            while steps_logged(run_dir) < 1:
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no step logged in time:\n" + log.read_text()[-4000:]
                seen |= descendants(proc.pid)
                time.sleep(0.2)
            seen |= descendants(proc.pid)
            victim = proc.pid
            if target == "launcher":
                launchers = [
                    p
                    for p in seen
                    if Path(f"/proc/{p}/stat").exists()
                    and int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid
                ]
                victim = launchers[0]
            if target == "group":  # a Ctrl-C in a terminal: every process of the foreground group
                os.killpg(proc.pid, sig)
            else:
                os.kill(victim, sig)
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            while any(alive(pid) for pid in seen) and time.monotonic() < deadline:  # orphans of a bare launcher
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in seen:  # never leave a worker behind, even when the test fails
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    return rc, log.read_text(), seen


def assert_preempted(rc: int, output: str, run_dir: Path, seen: set[int]) -> None:
    assert rc == 3, output[-5000:]
    assert "ChildFailedError" not in output  # the launcher saw clean exits; the 3 came by file
    ckpts = sorted((run_dir / "checkpoints").glob("step_*/meta.json"))
    assert ckpts, output[-5000:]
    meta = json.loads(ckpts[-1].read_text())
    assert meta["world_size"] == 2 and meta["step"] >= 1
    still = [pid for pid in seen if alive(pid)]
    assert not still, f"processes left alive: {still}\n{output[-3000:]}"


def test_torchrun_preemption_exits_3(tmp_path: Path) -> None:
    """SIGUSR1 to the supervisor: forwarded to both workers; torchrun would say 1, we say 3."""
    run_dir = tmp_path / "run"
    launcher = torchrun_launcher()
    rc, output, seen = preempt_through(launcher, run_dir)
    assert_preempted(rc, output, run_dir, seen)
    assert output.count("forwarded SIGUSR1") == 2


def test_deepspeed_launcher_preemption_exits_3(tmp_path: Path) -> None:
    """SIGUSR1 to the supervisor around `deepspeed --num_gpus 2`: forwarded to the workers below
    the runner and its launch.py; exit 3, a checkpoint, nothing left."""
    run_dir = tmp_path / "run"
    launcher = [
        str(Path(PYTHON).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "mdt_ds.train",
    ]
    rc, output, seen = preempt_through(launcher, run_dir)
    assert_preempted(rc, output, run_dir, seen)


def test_bare_torchrun_killed_by_usr1_leaves_no_worker_training(tmp_path: Path) -> None:
    """Without the supervisor: SIGUSR1 kills torchrun (rc 138, no handler); its workers, in their
    own sessions, notice the launcher is gone, checkpoint together and exit instead of training on.
    (A torchrun killed by SIGKILL under the supervisor ends its workers the same way.)"""
    run_dir = tmp_path / "run"
    launcher = torchrun_launcher()
    rc, output, seen = preempt_through(launcher, run_dir, supervised=False)
    assert rc == 128 + signal.SIGUSR1 or rc == -signal.SIGUSR1, output[-3000:]
    assert not [pid for pid in seen if alive(pid)], output[-3000:]
    assert sorted((run_dir / "checkpoints").glob("step_*/meta.json")), output[-3000:]


@pytest.mark.parametrize("supervised", [True, False], ids=["mdt-launch", "bare torchrun"])
def test_ctrl_c_checkpoints_through_the_launchers(tmp_path: Path, supervised: bool) -> None:
    """Ctrl-C (SIGINT to the whole foreground group): the workers finish their step, agree,
    checkpoint and end; no KeyboardInterrupt traceback of a worker. mdt-launch exits 3 (rerun to
    resume); bare torchrun reports its own SIGINT, but its workers' checkpoint is there."""
    run_dir = tmp_path / "run"
    rc, output, seen = preempt_through(torchrun_launcher(), run_dir, sig=signal.SIGINT, target="group",
                                       supervised=supervised)
    assert not [line for line in output.splitlines() if line.startswith("[rank") and "KeyboardInterrupt" in line]
    if supervised:
        assert_preempted(rc, output, run_dir, seen)
    else:
        assert sorted((run_dir / "checkpoints").glob("step_*/meta.json")), output[-3000:]
        assert not [pid for pid in seen if alive(pid)], output[-3000:]
