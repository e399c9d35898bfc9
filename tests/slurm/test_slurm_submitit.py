"""mdt-submit (submitit) on the real cluster, not a Local/DebugExecutor: a 2-node training job
interrupted as a preemption checkpoints, requeues and returns the finished run's result with the
uninterrupted loss curve; a cancelled job fails clearly and quickly, and is not requeued."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from mdt_ds import launch
from tests.conftest import PYTHON, REPO
from tests.slurm.helpers import JOB_TIMEOUT, STEPS, TINY, Cluster, Reference, loss_curve, read_jsonl, wait_for

pytestmark = pytest.mark.slurm


def _mdt_submit() -> list[str]:
    """The installed console script (setup.py: mdt-submit = mdt_ds.launch:main), else its module."""
    script = Path(PYTHON).parent / "mdt-submit"
    return [str(script)] if script.exists() else [PYTHON, "-m", "mdt_ds.launch"]


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_mdt_submit_preempted_job_requeues_resumes_and_returns(
    slurm_cluster: Cluster, reference_run: Reference, tmp_path: Path
) -> None:
    import submitit

    run_dir, folder = tmp_path / "run", tmp_path / "submitit"
    cmd = [
        *_mdt_submit(),
        "--nodes",
        "2",
        "--partition",
        slurm_cluster.partition,
        "--time",
        "15",
        "--folder",
        str(folder),
        "--json",
        *TINY,
        f"steps={STEPS}",
        f"run_dir={run_dir}",
    ]
    out = subprocess.run(cmd, env=slurm_cluster.job_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    info = json.loads(out.stdout.splitlines()[0])
    assert info["run_dir"] == str(run_dir) and info["stdout"].startswith(str(folder))
    job = submitit.SlurmJob(folder=folder, job_id=info["job_id"], tasks=(0, 1))

    wait_for(lambda: len(loss_curve(run_dir)) >= 2, 150, "two logged training steps", poll=0.1)
    job._interrupt()  # what Slurm does on preemption: SIGTERM, then submitit's USR2
    result = launch.wait([job], timeout_s=JOB_TIMEOUT)[0]
    assert result["step"] == STEPS and result["preempted"] is False and result["run_dir"] == str(run_dir)

    states = slurm_cluster.wait_sacct(job.job_id, lambda s: s[-1:] == ["COMPLETED"] or "FAILED" in s)
    assert states == ["REQUEUED", "COMPLETED"], states
    launches = read_jsonl(run_dir / "launch.jsonl")
    first = [r for r in launches if r["slurm_restart_count"] is None]
    again = [r for r in launches if r["slurm_restart_count"] == "1"]
    assert sorted((r["rank"], r["slurm_nodeid"]) for r in first) == [(0, "0"), (1, "1")], launches
    assert {r["world_size"] for r in launches} == {2} and {r["launcher"] for r in launches} == {"torchrun"}
    assert sorted(r["rank"] for r in again) == [0, 1], launches
    resumed = {r["start_step"] for r in again}
    assert len(resumed) == 1 and 0 < next(iter(resumed)) < STEPS, f"resumed at {resumed}"
    assert "requeued (restart 1)" in Path(info["stdout"]).read_text(errors="replace")
    # Exact resume, and the submitit route trains exactly like the sbatch route.
    assert loss_curve(run_dir) == reference_run.losses


@pytest.mark.timeout(JOB_TIMEOUT)
def test_cancelled_job_fails_clearly_without_requeue(slurm_cluster: Cluster, shm_op: None, tmp_path: Path) -> None:
    import submitit

    run_dir = tmp_path / "run"
    runs = launch.expand_runs([], [*TINY, "steps=100000", f"run_dir={run_dir}"])
    options = launch.SlurmOptions(nodes=2, partition=slurm_cluster.partition, time="15", env={"OMP_NUM_THREADS": "1"})
    [job] = launch.submit(runs, options, tmp_path / "submitit")
    wait_for(lambda: len(loss_curve(run_dir)) >= 1, 150, "training to start")
    job.cancel()
    job._results_timeout_s = 2  # no result file will come; do not wait 15 s for it
    start = time.monotonic()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        launch.wait([job], timeout_s=90)
    assert time.monotonic() - start < 90
    states = slurm_cluster.wait_sacct(job.job_id, lambda s: bool(s) and s[-1].startswith("CANCELLED"))
    assert states == ["CANCELLED"], states  # the trainer's clean stop on SIGTERM did not requeue it
    time.sleep(3)
    assert slurm_cluster.squeue_state(job.job_id) == "", "a cancelled job came back"


@pytest.mark.timeout(JOB_TIMEOUT)
def test_mdt_submit_module_job_requeues_on_exit_code_3(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """--module runs any program in every task (e.g. the sampler); exit code 3 after a preemption
    signal means "checkpointed, resume by rerun": the job requeues and its rerun's result returns."""
    import submitit

    run_dir, folder = tmp_path / "run", tmp_path / "submitit"
    cmd = [
        *_mdt_submit(),
        "--nodes",
        "2",
        "--partition",
        slurm_cluster.partition,
        "--time",
        "10",
        "--folder",
        str(folder),
        "--json",
        "--module",
        "tests.slurm.sleeper",
        "--",
        f"run_dir={run_dir}",
        "max_seconds=90",
    ]
    out = subprocess.run(cmd, env=slurm_cluster.job_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    job = submitit.SlurmJob(folder=folder, job_id=json.loads(out.stdout.splitlines()[0])["job_id"], tasks=(0, 1))
    wait_for(lambda: len(read_jsonl(run_dir / "launch.jsonl")) >= 2, 60, "both tasks to start")
    job._interrupt(timeout=True)  # a time-limit warning: submitit's USR2 only, relayed to the program
    result = launch.wait([job], timeout_s=120)[0]
    assert result == {"target": "tests.slurm.sleeper", "exit_code": 0, "rank": 0}
    assert slurm_cluster.wait_sacct(job.job_id, lambda s: s[-1:] == ["COMPLETED"]) == ["REQUEUED", "COMPLETED"]
    signals = read_jsonl(run_dir / "signals.jsonl")
    assert sorted(s["rank"] for s in signals) == [0, 1] and {s["signal"] for s in signals} == {"SIGUSR1"}
    again = [r for r in read_jsonl(run_dir / "launch.jsonl") if r["slurm_restart_count"] == "1"]
    assert sorted(r["rank"] for r in again) == [0, 1]


@pytest.mark.timeout(JOB_TIMEOUT)
def test_mdt_submit_sweep_is_one_job_array(slurm_cluster: Cluster, shm_op: None, tmp_path: Path) -> None:
    """Two configs in one submission: a job array, one run directory per task, both train."""
    base = tmp_path / "sweep"
    runs = launch.expand_runs([], [*TINY, "steps=2", f"run_dir={base}"], sweeps=["seed=1,2"])
    options = launch.SlurmOptions(nodes=1, partition=slurm_cluster.partition, time="10", env={"OMP_NUM_THREADS": "1"})
    jobs = launch.submit(runs, options)
    assert len(jobs) == 2 and len({str(j.job_id).split("_")[0] for j in jobs}) == 1  # one array
    results = launch.wait(jobs, timeout_s=JOB_TIMEOUT - 30)
    assert [r["step"] for r in results] == [2, 2]
    assert sorted(r["run_dir"] for r in results) == sorted(str(Path(r.run_dir).resolve()) for r in runs)
    assert sorted(json.loads((Path(r.run_dir) / "config.json").read_text())["seed"] for r in runs) == [1, 2]
    assert launch.default_folder(runs) == base / "submitit"
