"""slurm/train.sbatch with the real trainer on 2 nodes x 1 process (DeepSpeed ZeRO 2, CPU): it
trains and checkpoints; interrupted by the warning signal it checkpoints, requeues itself, resumes
and ends exactly where an uninterrupted run ends. Resubmitted on 1 node, a 2-node run continues."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.slurm.helpers import (
    JOB_TIMEOUT,
    STEPS,
    TASK_CPUS,
    Cluster,
    Reference,
    loss_curve,
    read_jsonl,
    submit_train_sbatch,
    wait_for,
)

pytestmark = pytest.mark.slurm


def test_sbatch_two_nodes_train_and_checkpoint(reference_run: Reference) -> None:
    run_dir = reference_run.run_dir
    launches = read_jsonl(run_dir / "launch.jsonl")
    # Both ranks took part, one per emulated node, in one world of 2, from step 0.
    assert sorted((r["rank"], r["slurm_nodeid"]) for r in launches) == [(0, "0"), (1, "1")], launches
    assert {r["world_size"] for r in launches} == {2} and {r["start_step"] for r in launches} == {0}
    assert {r["launcher"] for r in launches} == {"slurm"}
    assert {r["cpus"] for r in launches} == {TASK_CPUS}, launches  # each rank has the cores it asked for
    losses = reference_run.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values()), losses
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert f"step_{STEPS:07d}" in ckpts, ckpts
    assert "training step ended with exit code 0" in reference_run.log.read_text(errors="replace")


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_sbatch_warning_signal_checkpoints_requeues_and_resumes(
    slurm_cluster: Cluster, reference_run: Reference, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job, log = submit_train_sbatch(slurm_cluster, tmp_path, run_dir)
    wait_for(lambda: len(loss_curve(run_dir)) >= 2, 150, "two logged training steps", poll=0.1)
    # What Slurm does SIGNAL seconds before the time limit (#SBATCH --signal=B:USR1@...).
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    slurm_cluster.wait_gone(job, log=log)
    states = slurm_cluster.wait_sacct(job, lambda s: s[-1:] == ["COMPLETED"] or "FAILED" in s)
    text = log.read_text(errors="replace")
    assert states == ["REQUEUED", "COMPLETED"], f"{states}\n{text[-4000:]}"

    launches = read_jsonl(run_dir / "launch.jsonl")
    first = [r for r in launches if r["slurm_restart_count"] is None]
    again = [r for r in launches if r["slurm_restart_count"] == "1"]
    assert sorted(r["rank"] for r in first) == [0, 1] and {r["start_step"] for r in first} == {0}
    assert sorted(r["rank"] for r in again) == [0, 1], launches
    resumed = {r["start_step"] for r in again}
    assert len(resumed) == 1 and 0 < next(iter(resumed)) < STEPS, f"resumed at {resumed}"
    assert f"stopped by signal at step {next(iter(resumed))}" in text
    assert "requeueing job" in text and "training step ended with exit code 3" in text

    # Exact resume: same steps, same losses as the run that was never interrupted.
    assert loss_curve(run_dir) == reference_run.losses


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_two_node_run_continues_on_one_node(slurm_cluster: Cluster, reference_run: Reference, tmp_path: Path) -> None:
    """The 2-node run (24 steps, a checkpoint every 8) resubmitted with --nodes=1 and 4 more steps:
    one process resumes its step-24 checkpoint through the universal form and trains on."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.run_dir, run_dir)
    job, log = submit_train_sbatch(slurm_cluster, tmp_path, run_dir, f"steps={STEPS + 4}", nodes=1)
    slurm_cluster.wait_gone(job, log=log)
    states = slurm_cluster.wait_sacct(job, lambda s: bool(s) and s[-1] not in ("RUNNING", "PENDING"))
    text = log.read_text(errors="replace")
    assert states == ["COMPLETED"], f"{states}\n{text[-4000:]}"
    again = [r for r in read_jsonl(run_dir / "launch.jsonl") if r["start_step"] == STEPS]
    assert [(r["rank"], r["world_size"]) for r in again] == [(0, 1)], again
    assert "in a new layout: 2 processes ZeRO-2 -> 1 processes ZeRO-2" in text, text[-4000:]
    losses = loss_curve(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 5))
    assert {k: v for k, v in losses.items() if k <= STEPS} == reference_run.losses  # the 2-node part kept
    late = [losses[k] for k in range(STEPS + 1, STEPS + 5)]
    early = [losses[k] for k in range(1, 5)]
    assert sum(late) / 4 < sum(early) / 4, (early, late)  # continued, not restarted from random weights


@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_per_node_launchers_give_their_ranks_the_nodes_cores(
    slurm_cluster: Cluster, shm_op: None, tmp_path: Path, launcher: str
) -> None:
    """torchrun and the deepspeed launcher run one Slurm task per node that starts its ranks:
    that task must get all the CPUs the job has on the node (2 tasks x 1 CPU here), not one
    task's share (the ranks would share one core: serial compiles, a starved loader). Slurm
    releases differ in whether srun takes sbatch's --cpus-per-task; SRUN_CPUS_PER_TASK=1 makes
    this 22.05 take it as those that do, so the test sees what they would do."""
    run_dir = tmp_path / "run"
    env = slurm_cluster.job_env(MDT_LAUNCHER=launcher, MDT_NPROC_PER_NODE="2", SRUN_CPUS_PER_TASK="1")
    job, log = submit_train_sbatch(slurm_cluster, tmp_path, run_dir, "steps=2", "ckpt_every=0", env=env, nodes=1,
                                   cpus_per_task=1, sbatch_args=("--ntasks-per-node=2",))
    slurm_cluster.wait_gone(job, log=log)
    text = log.read_text(errors="replace")
    assert "training step ended with exit code 0" in text, text[-4000:]
    launches = read_jsonl(run_dir / "launch.jsonl")
    assert sorted(r["rank"] for r in launches) == [0, 1] and {r["cpus"] for r in launches} == {2}, launches
