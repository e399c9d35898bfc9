"""The world-size- and ZeRO-stage-independent training state (mdt_ds/universal.py): a save under
one layout loads bit-exactly under another (fp32 masters, every optimizer key, EMA, step counts),
and the next step matches the uninterrupted run. Three torchrun jobs (tests/universal_worker.py):
2 processes save and load across ZeRO stages, 1 process loads the 2-process save and saves, 2
processes load that. The reference states are gathered with DeepSpeed's safe_get_full_*, not
with mdt_ds.universal, so a key the universal form drops shows up as missing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, subprocess_env, torchrun_command

pytestmark = pytest.mark.trainer

STATE_KEYS = {"adan": ["exp_avg", "exp_avg_diff", "exp_avg_sq", "neg_pre_grad"], "adamw": ["exp_avg", "exp_avg_sq"]}


def _job(nproc: int, work: Path, phase: str) -> dict:
    out = work / f"{phase}.json"
    args = ("tests/universal_worker.py", str(out), str(work), phase)
    # one process: a bare python run (mdt_ds.dist picks a free port) saves torchrun's start-up
    cmd = [PYTHON, *args] if nproc == 1 else torchrun_command(nproc, *args)
    env = subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("universal")
    results = {"work": work, "save2": _job(2, work, "save2")}
    results["load1"] = _job(1, work, "load1")
    results["load2"] = _job(2, work, "load2")
    return results


def loads(runs: dict) -> dict[str, dict]:
    """Every load, named "<case>: <from> -> <to>"."""
    out = {}
    for case, res in runs["save2"].items():
        for key, load in res.items():
            if key.startswith("zero"):
                out[f"{case}: {load['summary']['from']} -> {load['summary']['to']}"] = load
    for phase in ("load1", "load2"):
        for case, load in runs[phase].items():
            out[f"{case}: {load['summary']['from']} -> {load['summary']['to']}"] = load
    return out


EXPECTED = [
    "bf16: 2x ZeRO-2 -> 2x ZeRO-3",
    "bf16: 2x ZeRO-3 -> 2x ZeRO-1",
    "bf16: 2x ZeRO-1 -> 2x ZeRO-0",
    "fp32: 2x ZeRO-2 -> 2x ZeRO-3",
    "fp32: 2x ZeRO-3 -> 2x ZeRO-1",
    "fp32: 2x ZeRO-1 -> 2x ZeRO-0",
    "adamw: 2x ZeRO-2 -> 2x ZeRO-3",
    "bf16: 2x ZeRO-2 -> 1x ZeRO-2",
    "fp32: 2x ZeRO-2 -> 1x ZeRO-2",
    "bf16: 1x ZeRO-2 -> 2x ZeRO-2",
    "fp32: 1x ZeRO-2 -> 2x ZeRO-2",
]


def test_every_layout_change_ran(runs: dict) -> None:
    assert sorted(loads(runs)) == sorted(EXPECTED)


def test_files_are_per_rank_safetensors_and_json(runs: dict) -> None:
    folder = runs["work"] / "z2_2p_bf16" / "universal"
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "rank00000.safetensors", "rank00001.safetensors"]
    index = json.loads((folder / "index.json").read_text())
    assert sorted(index["state_keys"]) == STATE_KEYS["adan"]
    assert index["layout"]["world_size"] == 2 and index["layout"]["zero_stage"] == 2
    # each rank wrote only its own fragments: no parameter range is held twice
    frags = [f for info in index["params"].values() for f in info["fragments"]]
    assert {rank for _, _, rank in frags} == {0, 1}
    assert sum(n for _, n, _ in frags) == sum(info["numel"] for info in index["params"].values())


@pytest.mark.parametrize("case", ["bf16", "fp32", "adamw"])
def test_reference_holds_every_optimizer_key(runs: dict, case: str) -> None:
    optimizer = "adamw" if case == "adamw" else "adan"
    assert runs["save2"][case]["keys"] == sorted(["ema", "fp32", *STATE_KEYS[optimizer]])


@pytest.mark.parametrize("name", EXPECTED)
def test_load_is_bit_exact(runs: dict, name: str) -> None:
    cmp = loads(runs)[name]["cmp"]
    assert cmp == {"missing": [], "extra": [], "unequal": []}, cmp


@pytest.mark.parametrize("name", EXPECTED)
def test_step_counts_and_schedule_continue(runs: dict, name: str) -> None:
    load = loads(runs)[name]
    scalars = load["scalars"]
    assert scalars["global_steps"] == 2 and scalars["sched_last_epoch"] == 2
    if name.startswith("adamw"):
        assert scalars["state_steps"] == [2.0], scalars  # torch AdamW: a 0-d step tensor per state owner
    else:
        assert [g["step"] for g in scalars["groups"]] == [2], scalars  # timm Adan: step in param_groups
    assert load["summary"]["state_keys"] == STATE_KEYS["adamw" if name.startswith("adamw") else "adan"]


@pytest.mark.parametrize("name", EXPECTED)
def test_next_step_matches_uninterrupted_run(runs: dict, name: str) -> None:
    # Layouts differ in reduction order only: fp32 agrees to rounding; bf16 reduces gradients
    # in bf16, differently per stage. A restarted step count (Adan's bias corrections) or a lost
    # moment changes the update by O(1), far outside these bounds.
    step = loads(runs)[name]["step"]
    assert "error" not in step, step
    bf16 = not name.startswith("fp32")
    assert abs(step["loss"] - step["loss_ref"]) <= (1e-4 if bf16 else 1e-6) * abs(step["loss_ref"]), step
    assert step["update_rel_norm"] < (0.05 if bf16 else 1e-4), step
    assert step["update_scale"] > 1e-4, step  # the step moved the weights


def test_coverage_errors_name_the_parameter() -> None:
    from mdt_ds.universal import UniversalError, check_coverage

    def index(*fragments: list[int]) -> dict:
        return {"params": {"blocks.0.w": {"numel": 10, "fragments": [list(f) for f in fragments]}}}

    check_coverage(index([0, 6, 0], [6, 4, 1]))
    for bad, word in (((0, 5, 0), (6, 4, 1)), "gap"), (((0, 7, 0), (6, 4, 1)), "overlap"), (((0, 6, 0),), "covers"):
        with pytest.raises(UniversalError, match=f"blocks.0.w.*{word}|{word}.*blocks.0.w|blocks.0.w covers"):
            check_coverage(index(*bad))
