"""Launcher environments mapped onto one view (torchrun, deepspeed, srun, submitit, bare), seeds
from (seed, rank, step), and a real 2-process gloo group."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mdt_ds import dist
from tests.conftest import REPO, subprocess_env, torchrun_command

pytestmark = pytest.mark.core

TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def test_torchrun_env() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node7", "MASTER_PORT": "23456"}
    got = dist.launcher_env(env)
    assert (got.rank, got.local_rank, got.world_size) == (3, 1, 8)
    assert (got.master_addr, got.master_port, got.launcher) == ("node7", 23456, "torchrun")
    assert got.as_environ() == env


@pytest.mark.parametrize("argv", [["--local_rank=1"], ["--local_rank", "1"], ["train.py", "--local-rank=1", "x=1"]])
def test_deepspeed_launcher_local_rank_argument(argv: list[str]) -> None:
    env = {"RANK": "5", "WORLD_SIZE": "6", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29600"}
    got = dist.launcher_env(env, argv)
    assert (got.rank, got.local_rank, got.world_size, got.master_addr, got.master_port) == (5, 1, 6, "10.0.0.2", 29600)
    # The environment's LOCAL_RANK (deepspeed exports it too) agrees with the argument.
    assert dist.launcher_env({**env, "LOCAL_RANK": "1"}, argv).local_rank == 1


def slurm_env(procid: int, localid: int, **extra: str) -> dict[str, str]:
    return {
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NTASKS": "6",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[3-5],gpu1",
        **extra,
    }


def test_srun_env() -> None:
    a = dist.launcher_env(slurm_env(4, 1))
    assert (a.rank, a.local_rank, a.world_size, a.master_addr, a.launcher) == (4, 1, 6, "node3", "slurm")
    b = dist.launcher_env(slurm_env(0, 0))
    assert a.master_port == b.master_port and 1024 < a.master_port < 65536  # every task derives the same port
    assert dist.launcher_env(slurm_env(0, 0, SLURM_JOB_ID="4243")).master_port != a.master_port  # per job
    assert dist.launcher_env(slurm_env(0, 0, MASTER_PORT="31000")).master_port == 31000
    # The step's node list wins over the job's (a step may run on a subset of the job's nodes).
    assert dist.launcher_env(slurm_env(0, 0, SLURM_STEP_NODELIST="node[5-6]")).master_addr == "node5"


def test_slurm_batch_shell_without_step_is_one_process() -> None:
    env = slurm_env(0, 0)
    del env["SLURM_STEP_ID"]
    env["SLURM_NTASKS"] = "4"
    got = dist.launcher_env(env)
    assert (got.rank, got.world_size, got.launcher) == (0, 1, "none")


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node[3-5],gpu1", "node3"),
        ("gpu[03-05,9],cpu1", "gpu03"),
        ("node1", "node1"),
        ("a1,b2", "a1"),
        ("rack-[12,14]", "rack-12"),
        ("n[7]", "n7"),
    ],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert dist.first_slurm_host(nodelist) == first


def test_submitit_exported_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's TorchDistributedEnvironment().export() inside an srun step: the torchrun
    variables it writes win, and agree with what Slurm says."""
    helpers = pytest.importorskip("submitit.helpers")
    slurm = {**slurm_env(4, 1), "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "2"}
    # export() writes into os.environ; restore all of it so no RANK/WORLD_SIZE leaks into later
    # tests' subprocesses.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in TORCH_VARS:
        os.environ.pop(key, None)
    os.environ.update(slurm)
    helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    exported = {k: os.environ[k] for k in TORCH_VARS}
    got = dist.launcher_env(dict(os.environ))
    assert got.launcher == "torchrun"
    assert (got.rank, got.local_rank, got.world_size, got.master_addr) == (4, 1, 6, "node3")
    assert got.master_port == int(exported["MASTER_PORT"])


def test_bare_process() -> None:
    got = dist.launcher_env({})
    assert (got.rank, got.local_rank, got.world_size, got.master_addr, got.launcher) == (0, 0, 1, "127.0.0.1", "none")
    assert 0 < got.master_port < 65536
    assert dist.launcher_env({"MASTER_PORT": "12345"}).master_port == 12345
    assert dist.launcher_env({}, ["--local_rank=0"]).world_size == 1


def test_rank_helpers_without_a_group() -> None:
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    dist.barrier()  # no-op
    assert dist.mean_across_ranks({"b": torch.tensor(2.0), "a": 1}) == {"a": 1.0, "b": 2.0}


def test_derive_seed_is_stable() -> None:
    want = int.from_bytes(hashlib.sha256(b"0/1/100").digest()[:8], "little") & (2**63 - 1)
    assert dist.derive_seed(0, 1, 100) == want
    seeds = {dist.derive_seed(7, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert dist.derive_seed(1, 23) != dist.derive_seed(12, 3)  # parts are separated
    # sha256 of the parts: the same in every process and on every machine (no Python hash salt).
    assert dist.derive_seed("0", "1", "100") == want


def test_seed_everything() -> None:
    derived = dist.seed_everything(3, rank=1, step=10)
    assert derived == dist.derive_seed(3, 1, 10)
    a = torch.rand(3)
    dist.seed_everything(3, rank=1, step=10)
    assert torch.equal(a, torch.rand(3))
    dist.seed_everything(3, rank=0, step=10)
    assert not torch.equal(a, torch.rand(3))


SMOKE = textwrap.dedent(
    """
    import os, sys
    import torch
    from mdt_ds import dist

    env = dist.init(sys.argv[1:])
    assert env.world_size == 2 and env.launcher == "torchrun", env
    assert dist.world_size() == 2 and dist.rank() == env.rank == int(os.environ["RANK"])
    assert torch.distributed.get_backend() == "gloo"
    out = dist.mean_across_ranks({"a": env.rank + 1.0, "b": torch.tensor(10.0 * env.rank)})
    assert out == {"a": 1.5, "b": 5.0}, out
    dist.barrier()
    print(f"rank {env.rank} local {env.local_rank} main {dist.is_main()} ok", flush=True)
    dist.teardown()
    """
)


def test_two_process_gloo(tmp_path) -> None:
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE)
    cmd = torchrun_command(
        2,
        str(script),
    )
    env = subprocess_env()
    for key in TORCH_VARS:
        env.pop(key, None)
    # Own process group, so a hang kills the launcher and both workers (hard timeout).
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"2-process gloo run timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "rank 0 local 0 main True ok" in stdout
    assert "rank 1 local 1 main False ok" in stdout


EXIT_AFTER_TEARDOWN = textwrap.dedent(
    """
    import atexit, os, sys
    from mdt_ds import dist

    # Stands in for a C++ thread that aborts the process during interpreter finalisation.
    atexit.register(os.abort)
    sys.stdout = os.fdopen(1, "w", buffering=1 << 16)  # block-buffered, as stdout into a pipe
    print("images written")
    dist.teardown(synchronise=True)  # no group here: a no-op that must not fail
    dist.exit_launched_rank(int(sys.argv[1]))
    """
)


@pytest.mark.parametrize("code", [0, 2])
def test_a_finished_rank_exits_with_its_code_and_output_before_finalisation(tmp_path, code: int) -> None:
    """CI once saw a rank abort (SIGABRT) at interpreter shutdown after a clean two-rank sampler
    run, so torchrun failed a complete job. The helper skips finalisation, yet keeps the exit
    code and the buffered output."""
    script = tmp_path / "finish.py"
    script.write_text(EXIT_AFTER_TEARDOWN)
    proc = subprocess.run(
        [sys.executable, str(script), str(code)],
        env=subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stdout == "images written\n"


def test_each_process_finds_its_gpu_or_one_clear_error() -> None:
    """srun --gpus-per-task=1 shows each task one GPU, as cuda:0: cuda:LOCAL_RANK would fail deep
    in CUDA. The extractor and sampler take cuda:0 then; DeepSpeed training cannot, and says so."""
    from mdt_ds.config import ConfigError

    assert dist.local_gpu(7, 8) == 7 and dist.local_gpu(5, 1) == 0 and dist.local_gpu(0, 1, shown_one_each=False) == 0
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=5 but this process sees 1 GPU\(s\) \(training.*--gpus-per-node"):
        dist.local_gpu(5, 1, shown_one_each=False)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=5 but this process sees 2 GPU\(s\)\. Slurm"):
        dist.local_gpu(5, 2)


def test_the_collective_timeout_reaches_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """comm.timeout_min / --timeout-min become the group's timeout, through torch and through
    DeepSpeed (whose own default is 10 minutes), instead of the libraries' defaults."""
    import datetime

    import deepspeed

    given: list[tuple[str, object]] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: given.append(("torch", kw["timeout"])))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: given.append(("deepspeed", kw["timeout"])))
    monkeypatch.setattr(dist, "export", lambda env: None)  # leave this process's environment alone
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    dist.init(timeout_min=7)
    dist.init(use_deepspeed=True, timeout_min=90)
    assert given == [("torch", datetime.timedelta(minutes=7)), ("deepspeed", datetime.timedelta(minutes=90))]
    assert dist.DEFAULT_TIMEOUT_MIN == 60
