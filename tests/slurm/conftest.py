"""Fixtures of the tests on a real local Slurm cluster (tests/slurm/start-local-slurm.sh).

The session fixture ``slurm_cluster`` installs and starts the cluster once (2 emulated nodes,
accounting) and always stops it by PID at the end, also when tests fail or are interrupted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for `tests.*` under any runner
from tests.conftest import PYTHON, subprocess_env  # noqa: E402
from tests.slurm.helpers import (  # noqa: E402
    START,
    STOP,
    Cluster,
    Reference,
    loss_curve,
    submit_train_sbatch,
)


def _tool_missing() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (it installs packages and starts daemons)"
    if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()) and not shutil.which("apt-get"):
        return "no Slurm installed and no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    reason = _tool_missing()
    if reason:
        pytest.skip(reason)
    # MDT_SLURM_DIR: use (or start) the cluster of that state directory and leave it running, to
    # iterate on tests quickly; by default a fresh cluster lives as long as the session.
    reuse = os.environ.get("MDT_SLURM_DIR")
    state_dir = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="mdt-slurm-"))
    started = False
    try:
        proc = subprocess.run(["bash", str(START), str(state_dir)], capture_output=True, text=True, timeout=600)
        started = True
        if proc.returncode != 0:
            pytest.fail(f"start-local-slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
        env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        cluster = Cluster(state_dir, {"SLURM_CONF": env["SLURM_CONF"]}, env.get("MDT_SLURM_PARTITION", "debug"))
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # submitit calls sbatch/sacct/scancel from this process
        try:
            yield cluster
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
    finally:
        if (started or state_dir.exists()) and not reuse:
            keep = os.environ.get("MDT_SLURM_KEEP_STATE") == "1"
            stop = subprocess.run(
                ["bash", str(STOP), str(state_dir), *([] if keep else ["--wipe"])],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if stop.returncode != 0:
                print(f"stop-local-slurm.sh: {stop.stdout}\n{stop.stderr}")
            if state_dir.is_dir() and not any(state_dir.iterdir()):
                state_dir.rmdir()  # a start that failed before writing anything


@pytest.fixture(scope="session")
def shm_op() -> None:
    """DeepSpeed's shm comm op built once into the repo-local TORCH_EXTENSIONS_DIR (the test setup
    normally did it already), so that two ranks of a job never build it at the same time."""
    ext = Path(subprocess_env()["TORCH_EXTENSIONS_DIR"])
    if any(ext.rglob("deepspeed_shm_comm*.so")):
        return
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
    subprocess.run([PYTHON, "-c", code], env=subprocess_env(), check=True, timeout=600, capture_output=True)


@pytest.fixture(scope="session")
def reference_run(slurm_cluster: Cluster, shm_op: None, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted 2-node run through slurm/train.sbatch: the loss curve every interrupted
    run (sbatch or submitit) must reproduce."""
    work = tmp_path_factory.mktemp("reference")
    run_dir = work / "run"
    job_id, log = submit_train_sbatch(slurm_cluster, work, run_dir)
    slurm_cluster.wait_gone(job_id, log=log)
    states = slurm_cluster.wait_sacct(job_id, lambda s: bool(s) and s[-1] not in ("RUNNING", "PENDING"))
    assert states == ["COMPLETED"], f"reference job {job_id}: {states}\n{log.read_text(errors='replace')[-3000:]}"
    return Reference(run_dir, job_id, log, loss_curve(run_dir))
