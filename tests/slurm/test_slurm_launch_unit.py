"""mdt-submit's pieces that need no cluster: time parsing, sbatch parameters, sweeps, the CLI's
dry run, and the signal relay that routes submitit's preemption signal to the trainer."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from mdt_ds import launch
from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.slurm

TINY_CFG = ["model.preset=MDTv2-Tiny/2", "global_batch=8"]


def test_exit_code_is_the_trainers() -> None:
    from mdt_ds.train import EXIT_PREEMPTED

    assert launch.EXIT_PREEMPTED == EXIT_PREEMPTED


@pytest.mark.parametrize(
    "text, minutes",
    [
        ("90", 90),
        ("30:00", 30),
        ("30:01", 31),
        ("1:30:00", 90),
        ("2-00", 2880),
        ("1-02:03", 1563),
        ("1-00:00:30", 1441),
        (45, 45),
    ],
)
def test_parse_time_follows_sbatch(text: str | int, minutes: int) -> None:
    assert launch.parse_time(text) == minutes


def test_parse_time_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="--time"):
        launch.parse_time("2 days")


def test_executor_parameters_carry_every_option() -> None:
    opts = launch.SlurmOptions(
        nodes=4,
        gpus_per_node=8,
        cpus_per_task=12,
        partition="gpu",
        account="proj",
        time="2-00:00:00",
        constraint="h100",
        qos="high",
        mem="480G",
        exclusive=True,
        sbatch={"reservation": "big"},
        setup=["module load cuda"],
        env={"NCCL_DEBUG": "WARN"},
    )
    params = opts.executor_parameters()
    assert params["nodes"] == 4 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["timeout_min"] == 2880 and params["cpus_per_task"] == 12
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "proj"
    assert params["slurm_constraint"] == "h100" and params["slurm_qos"] == "high" and params["slurm_mem"] == "480G"
    assert params["slurm_exclusive"] is True
    assert params["slurm_additional_parameters"] == {"requeue": True, "reservation": "big"}
    assert params["slurm_setup"] == ["module load cuda", "export NCCL_DEBUG=WARN"]
    assert params["slurm_signal_delay_s"] == 180
    assert params["slurm_srun_args"] == ["--wait=120", "--cpus-per-task=12"]  # srun may not inherit it
    assert launch.SlurmOptions(nodes=2).executor_parameters()["slurm_srun_args"] == ["--wait=120"]
    assert opts.world_size == 32
    # A GPU-less job does not ask for GPUs at all; the local executor gets only generic keys.
    assert "gpus_per_node" not in launch.SlurmOptions(nodes=2).executor_parameters()
    assert not any(k.startswith("slurm_") for k in opts.executor_parameters("local"))


def test_sweep_and_array_configs_get_their_own_run_dirs(tmp_path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("optim:\n  lr: 0.001\n")
    b.write_text("optim:\n  lr: 0.002\n")
    runs = launch.expand_runs([], [*TINY_CFG, f"run_dir={tmp_path}/r"], [str(a), str(b)], ["seed=1,2"])
    assert len(runs) == 4
    assert len({r.run_dir for r in runs}) == 4
    assert all(r.run_dir.startswith(f"{tmp_path}/r/") for r in runs)
    from mdt_ds.config import load_config

    cfgs = [load_config(r.configs, r.overrides) for r in runs]
    assert sorted((c.optim.lr, c.seed) for c in cfgs) == [(0.001, 1), (0.001, 2), (0.002, 1), (0.002, 2)]
    assert [c.run_dir for c in cfgs] == [r.run_dir for r in runs]
    # One run keeps its run_dir as given.
    [single] = launch.expand_runs([], [*TINY_CFG, f"run_dir={tmp_path}/one"])
    assert single.run_dir == f"{tmp_path}/one"
    assert launch.default_folder([single]) == tmp_path / "one" / "submitit"


def test_cli_dry_run_and_config_errors(tmp_path) -> None:
    cmd = [
        PYTHON,
        "-m",
        "mdt_ds.launch",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "p",
        "--time",
        "1:00:00",
        "--sbatch",
        "reservation=r",
        "--dry-run",
        *TINY_CFG,
        f"run_dir={tmp_path}/r",
        "--sweep",
        "optim.lr=1e-4,3e-4",
    ]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["executor"]["nodes"] == 2 and plan["executor"]["tasks_per_node"] == 4
    assert plan["executor"]["timeout_min"] == 60
    assert plan["executor"]["slurm_additional_parameters"]["reservation"] == "r"
    assert len(plan["runs"]) == 2 and plan["folder"] == f"{tmp_path}/r/submitit"
    # global_batch 8 cannot be split over 2 x 3 ranks: refused before anything is queued.
    bad = subprocess.run(
        cmd[:3] + ["--nodes", "2", "--tasks-per-node", "3", "--dry-run", *TINY_CFG],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "global_batch" in bad.stderr
    typo = subprocess.run(
        cmd[:3] + ["--dry-run", "optim.lrr=1"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert typo.returncode == 2 and "lrr" in typo.stderr


RELAY_CHECK = textwrap.dedent(
    """
    import os, signal, time
    from mdt_ds.slurm_job import _Relay
    from mdt_ds.preemption import StopFlag

    def wait(flag, seconds=5.0):
        end = time.monotonic() + seconds
        while not flag.requested and time.monotonic() < end:
            time.sleep(0.05)
        return flag.requested

    relay = _Relay().install()
    # 1. submitit's USR2 while the trainer listens: the trainer's handler gets it at once.
    flag = StopFlag().install()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert wait(flag), "USR2 did not reach the trainer"
    flag.restore()
    # 2. A signal before the trainer listens is kept (the process survives) and delivered later.
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    late = StopFlag().install()
    assert wait(late), "early signal was not delivered once the trainer listened"
    late.restore()
    print("relay ok", relay.received)
    """
)


def test_relay_routes_preemption_signals_to_the_trainer() -> None:
    out = subprocess.run(
        [PYTHON, "-c", RELAY_CHECK], env=subprocess_env(), capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0 and "relay ok" in out.stdout, out.stdout + out.stderr


UNHANDLED_CHECK = textwrap.dedent(
    """
    import os, signal, threading, time
    from mdt_ds.slurm_job import _Relay

    called = threading.Event()
    _Relay(on_unhandled_warning=called.set).install()
    os.kill(os.getpid(), signal.SIGUSR2)  # nobody listens: the job requeues at once
    assert called.wait(5), "unhandled warning did not requeue"
    print("requeue called", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # nobody listens: ends the process as without submitit
    time.sleep(5)
    print("still alive", flush=True)
    """
)


def test_relay_requeues_for_programs_that_do_not_listen() -> None:
    out = subprocess.run(
        [PYTHON, "-c", UNHANDLED_CHECK], env=subprocess_env(), capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert "requeue called" in out.stdout and "still alive" not in out.stdout, out.stdout + out.stderr
    assert out.returncode == -15


def test_sbatch_templates_export_the_timeout_and_give_every_srun_its_cpus() -> None:
    """The templates' multi-node settings: DeepSpeed's collectives wait 60 minutes (its default is
    10), train.sbatch gives compile one inductor cache per node, and every srun names its CPUs
    (several Slurm releases do not pass sbatch's --cpus-per-task on; the local cluster's test runs
    the per-node launchers)."""
    import re

    from tests.conftest import REPO

    for name in ("train.sbatch", "sample.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert re.search(r"^export DEEPSPEED_TIMEOUT=\$\{DEEPSPEED_TIMEOUT:-60\}$", text, re.M), name
        sruns = [line for line in text.splitlines() if line.strip().startswith("srun ")]
        assert sruns and all("--cpus-per-task=" in line for line in sruns), (name, sruns)
    assert "export TORCHINDUCTOR_CACHE_DIR=" in (REPO / "slurm" / "train.sbatch").read_text()
