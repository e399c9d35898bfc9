"""The local cluster itself and slurm/train.sbatch's plumbing, with a stand-in trainer that starts
in a blink (tests/slurm/sleeper.py): two nodes, hostfile, a cancel that must not requeue, and the
torchrun and deepspeed launchers passing the warning signal to the workers only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.helpers import TRAIN_SBATCH, Cluster, read_jsonl, wait_for

pytestmark = pytest.mark.slurm


def test_two_emulated_nodes_and_hostfile(slurm_cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={out}",
        "--wrap",
        f"srun bash -c 'echo task $SLURM_PROCID on $SLURMD_NODENAME'; getent hosts node2; {REPO}/slurm/hostfile.sh 8",
    )
    slurm_cluster.wait_gone(job, timeout=60, log=out)
    text = out.read_text()
    assert "task 0 on node1" in text and "task 1 on node2" in text, text
    assert "127.0.0.1" in text  # node names resolve inside jobs (private /etc/hosts of each slurmd)
    assert "node1 slots=8\nnode2 slots=8" in text, text
    assert slurm_cluster.wait_sacct(job, lambda s: s == ["COMPLETED"]) == ["COMPLETED"]
    # The helper also expands an arbitrary node list (DeepSpeed hostfile format).
    hf = subprocess.run(
        [str(REPO / "slurm" / "hostfile.sh"), "4"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**slurm_cluster.job_env(), "NODELIST": "gpu[01-03],cpu7"},
    )
    assert hf.stdout.split("\n")[:4] == ["gpu01 slots=4", "gpu02 slots=4", "gpu03 slots=4", "cpu7 slots=4"]


def _sleeper_job(cluster: Cluster, tmp_path: Path, launcher: str = "srun", **env: str) -> tuple[str, Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir, log = tmp_path / "run", tmp_path / "slurm.out"
    env = cluster.job_env(MDT_TRAIN_MODULE="tests.slurm.sleeper", MDT_LAUNCHER=launcher, MDT_NPROC_PER_NODE="2", **env)
    job = cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={log}",
        "--time=10",
        str(TRAIN_SBATCH),
        f"run_dir={run_dir}",
        "max_seconds=90",
        env=env,
    )
    return job, run_dir, log


def test_cancelled_sbatch_job_is_not_requeued(slurm_cluster: Cluster, tmp_path: Path) -> None:
    job, run_dir, log = _sleeper_job(slurm_cluster, tmp_path)
    wait_for(lambda: len(read_jsonl(run_dir / "launch.jsonl")) >= 2, 60, "both ranks to start")
    slurm_cluster.run("scancel", job)
    slurm_cluster.wait_gone(job, timeout=60, log=log)
    states = slurm_cluster.wait_sacct(job, lambda s: bool(s) and s[-1].startswith("CANCELLED"))
    assert states == ["CANCELLED"], states
    signals = read_jsonl(run_dir / "signals.jsonl")
    assert {s["signal"] for s in signals} == {"SIGTERM"}  # the ranks got SIGTERM and stopped cleanly
    assert "requeueing job" not in log.read_text(errors="replace")


@pytest.mark.timeout(240)
def test_torchrun_and_deepspeed_launchers_pass_the_warning_to_workers(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """USR1 reaches every worker (4 = 2 nodes x 2), not torchrun / the deepspeed launcher, which
    would die of it. (MDT_MAX_REQUEUES=0 here: the requeue itself is tested with the trainer.)"""
    # 1 CPU per node each: both jobs run at once on the 2-CPU emulated nodes.
    jobs = {
        name: _sleeper_job(slurm_cluster, tmp_path / name, name, MDT_MAX_REQUEUES="0")
        for name in ("torchrun", "deepspeed")
    }
    waiting = set(jobs)

    def signal_ready() -> bool:
        for name in sorted(waiting):
            job, run_dir, _ = jobs[name]
            if len(read_jsonl(run_dir / "launch.jsonl")) >= 4:
                slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
                waiting.discard(name)
        return not waiting

    wait_for(signal_ready, 150, "4 workers of each launcher to start")
    for name, (job, run_dir, log) in jobs.items():
        slurm_cluster.wait_gone(job, timeout=120, log=log)
        text = log.read_text(errors="replace")
        launches = read_jsonl(run_dir / "launch.jsonl")
        assert sorted(r["rank"] for r in launches) == [0, 1, 2, 3], (name, launches)
        assert {r["world_size"] for r in launches} == {4} and {r["slurm_nodeid"] for r in launches} == {"0", "1"}
        signals = read_jsonl(run_dir / "signals.jsonl")
        assert sorted(s["rank"] for s in signals) == [0, 1, 2, 3], (name, signals, text[-3000:])
        assert {s["signal"] for s in signals} == {"SIGUSR1"}
        assert "not requeueing: already requeued 0 times" in text, text[-3000:]
        assert slurm_cluster.wait_sacct(job, lambda s: s[-1:] == ["FAILED"]) == ["FAILED"]
