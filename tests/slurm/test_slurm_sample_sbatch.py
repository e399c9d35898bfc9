"""slurm/sample.sbatch on 2 nodes x 1 process: the distributed sampler writes one ADM .npz from the
reference run's EMA snapshot. (The evaluator step, REF_BATCH=..., needs about a minute of Inception
on this CPU and is left to the evaluation tests.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.slurm.helpers import STEPS, Cluster, Reference

pytestmark = pytest.mark.slurm


def test_sample_sbatch_two_nodes_write_one_npz(
    slurm_cluster: Cluster, reference_run: Reference, tmp_path: Path
) -> None:
    snapshot = reference_run.run_dir / "snapshots" / f"ema_{STEPS:07d}.pt"
    assert snapshot.exists(), sorted(p.name for p in (reference_run.run_dir / "snapshots").iterdir())
    out, log = tmp_path / "samples.npz", tmp_path / "slurm.out"
    job = slurm_cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={log}",
        "--time=10",
        str(REPO / "slurm" / "sample.sbatch"),
        "--ckpt",
        str(snapshot),
        "--vae",
        "pixel",
        "--num-samples",
        "8",
        "--batch-size",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--cfg-scale",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--output",
        str(out),
    )
    slurm_cluster.wait_gone(job, timeout=120, log=log)
    text = log.read_text(errors="replace")
    assert "sampling ended with exit code 0" in text, text[-3000:]
    assert "on 2 ranks" in text, text[-3000:]
    with np.load(out) as npz:
        images = npz["arr_0"]
    assert images.shape[0] == 8 and images.dtype == np.uint8
    assert slurm_cluster.wait_sacct(job, lambda s: s == ["COMPLETED"]) == ["COMPLETED"]
