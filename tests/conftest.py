"""Shared test fixtures. Tests run on CPU with fixed thread counts (bit-exact comparisons)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"the release fixtures are missing: expected {FIXTURES}")
    return FIXTURES


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: repo on PYTHONPATH, one thread each, CPU DeepSpeed."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


PYTHON = sys.executable

# The tiny run most trainer-level tests train: MDTv2-Tiny/2 on the embedded 16x16 MNIST digits.
TINY_RUN = [
    "model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1", "data.source=mnist16",
    "data.num_workers=0", "data.shuffle_buffer=64", "global_batch=8", "log_every=1", "ema_decay=0.9",
    "optim.lr=1e-3",
]


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` on one node with a free rendezvous port."""
    from mdt_ds.dist import free_port

    return [PYTHON, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
