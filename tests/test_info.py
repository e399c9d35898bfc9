"""mdt-info: the cost arithmetic against hand-worked cases, the CLI in-process, and one-line errors."""

from __future__ import annotations

import json

import pytest

from mdt_ds.checkpoint import estimate_bytes
from mdt_ds.models import build_model
from mdt_ds.models.flops import train_macs_per_image
from mdt_ds.tools import info

pytestmark = pytest.mark.core
TINY = ["--model", "MDTv2-Tiny/2", "--gpus", "1", "--micro-batch", "4", "--global-batch", "8"]


def run_json(capsys, *argv: str) -> dict:
    assert info.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_parameters_and_macs_match_the_built_model(capsys) -> None:
    report = run_json(capsys, *TINY)
    model = build_model("MDTv2-Tiny/2")
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["train_macs_per_image"] == train_macs_per_image(model)
    xl = run_json(capsys, "--model", "MDTv2-XL/2")  # meta device: nothing allocated
    assert xl["params"] == 742_263_904 and round(xl["train_macs_per_image"] / 1e12, 3) == 0.655


@pytest.mark.parametrize(
    "precision,optimizer,stage,per_param",
    [
        # bytes per parameter on 8 GPUs: weights + grads + fp32 master + moments + EMA
        ("bf16", "adan", 0, 2 + 2 + 4 + 16 + 4),  # nothing sharded: 28
        ("bf16", "adan", 1, 2 + 2 + (4 + 16 + 4) / 8),  # optimizer states (and EMA) sharded: 7
        ("bf16", "adan", 2, 2 + (2 + 4 + 16 + 4) / 8),  # + gradients: 5.25
        ("bf16", "adan", 3, (2 + 2 + 4 + 16 + 4) / 8),  # + weights: 3.5
        ("bf16", "adamw", 0, 2 + 2 + 4 + 8 + 4),  # 2 moments: 20
        ("fp32", "adan", 0, 4 + 4 + 0 + 16 + 4),  # the parameters are the master: 28
        ("fp32", "adan", 2, 4 + (4 + 4 + 16 + 4) / 8),  # ZeRO-2 clones an fp32 partition: 7.5
        ("fp32", "adan", 3, (4 + 4 + 0 + 16 + 4) / 8),  # ZeRO-3 reuses it: 3.5
    ],
)
def test_state_memory_per_zero_stage_on_8_gpus(precision, optimizer, stage, per_param) -> None:
    states = info.state_bytes(1_000_000, precision, stage, 8, optimizer)
    assert sum(states.values()) == pytest.approx(per_param * 1_000_000)


def test_zero3_is_an_eighth_of_zero0_through_the_cli(capsys) -> None:
    base = ["--model", "MDTv2-S/2", "--gpus", "8", "--micro-batch", "32"]
    zero0 = run_json(capsys, *base, "--zero-stage", "0")["memory_per_gpu"]
    zero3 = run_json(capsys, *base, "--zero-stage", "3")["memory_per_gpu"]
    assert zero0["states_total"] == 28 * 38_454_872
    assert zero3["states_total"] == pytest.approx(zero0["states_total"] / 8)
    # activations are per GPU and do not shard
    assert zero0["activations_estimate"] == zero3["activations_estimate"]


def test_activation_estimate_worked_by_hand() -> None:
    """Tiny/2: 16 tokens, h=64, 4 heads; en_in, en_out (skip), side, 2 de (skip); masked pass
    keeps int(16 * 0.7) = 11 tokens. Elements per token: 20h + 4T, skip blocks + 2h."""
    model = build_model("MDTv2-Tiny/2", device="meta")
    full = 16 * 1344 + 16 * 1472 + 2 * 16 * 1472  # en_in, en_out, de x2 at 16 tokens
    masked = 11 * 1324 + 11 * 1452 + 16 * 1344 + 2 * 16 * 1472  # en_in, en_out at 11; side, de x2 at 16
    assert info.activation_bytes(model, 1, "bf16", "none")["bytes"] == 2 * (full + masked) == 382_608
    assert info.activation_bytes(model, 2, "fp32", "none")["bytes"] == 2 * 4 * (full + masked)
    # "all": every block keeps its input (134 token-runs x 64), plus one block recomputed (de, 16 tokens)
    assert info.activation_bytes(model, 1, "bf16", "all") == {
        "bytes": 2 * (134 * 64 + 16 * 1472),
        "checkpointed_blocks": 5,
    }
    scopes = info.activation_report(model, 1, "bf16", "encoder")["by_scope"]
    assert scopes["all"] < scopes["encoder"] < scopes["none"]


def test_speed_worked_by_hand() -> None:
    # 1 TMAC per image = 2 TFLOP; 50% of 1 PFLOP/s: 250 img/s per GPU, 2000 on 8
    out = info.speed(10**12, 1e15, 0.5, 8, 256)
    assert out["imgs_per_s_per_gpu"] == pytest.approx(250)
    assert out["imgs_per_s"] == pytest.approx(2000)
    assert out["hours_per_100k_steps"] == pytest.approx(100_000 * 256 / 2000 / 3600)  # 3.56 h
    assert out["paper_gpu_hours"] == pytest.approx(4_600_000 * 256 / 250 / 3600)  # 1308 GPU-hours
    assert out["paper_wall_hours"] == pytest.approx(out["paper_gpu_hours"] / 8)


def test_cli_speed_uses_the_peak_table_and_states_the_assumed_mfu(capsys) -> None:
    report = run_json(capsys, "--model", "MDTv2-XL/2", "--gpu", "H100", "--gpus", "8")
    sp = report["speed"]
    assert sp["peak_flops"] == 989e12 and sp["mfu"] == 0.35 and "assumed" in sp["mfu_source"]
    assert sp["imgs_per_s_per_gpu"] == pytest.approx(0.35 * 989e12 / (2 * report["train_macs_per_image"]))
    a100 = run_json(capsys, "--gpu", "A100", "--precision", "fp32", "--tf32", "--mfu", "0.5")["speed"]
    assert a100["peak_flops"] == 156e12 and a100["mfu_source"] == "given (--mfu)"
    assert run_json(capsys, "--gpu", "A100", "--precision", "fp32")["speed"]["peak_flops"] == 19.5e12


def test_disk_and_extraction(capsys) -> None:
    report = run_json(capsys, *TINY, "--vae-imgs-per-s", "400")
    params = report["params"]
    disk = report["disk"]
    # bf16 Adan: DeepSpeed 2 + 4 + 16 + 4 bytes; universal 4 x (4 + 2) in every 4th checkpoint only
    assert disk["checkpoint"] == 26 * params == estimate_bytes(params, "bf16", "adan")["checkpoint"]
    assert disk["universal"] == 24 * params == estimate_bytes(params, "bf16", "adan")["universal"]
    assert disk["snapshot"] == 4 * params
    # keep_ckpts 3 (one of them universal at most), keep_snapshots 10
    assert disk["kept_total"] == 3 * 26 * params + 24 * params + 10 * 4 * params
    every = run_json(capsys, *TINY, "--universal-every", "1", "--keep-ckpts", "5")["disk"]
    assert every["kept_total"] == 5 * 50 * params + 10 * 4 * params
    assert run_json(capsys, *TINY, "--keep-ckpts", "0")["disk"]["kept_total"] is None
    ex = report["extraction"]
    assert ex["hours"] == pytest.approx(2 * 1_281_167 / 400 / 3600)  # image + flip, one GPU
    assert info.extraction(400, 2)["hours"] == pytest.approx(ex["hours"] / 2)


def test_communication_worked_by_hand() -> None:
    """ZeRO paper volumes, ring (N-1)/N: XL/2-size 675M parameters on 64 GPUs, bf16."""
    psi, ring = 675_000_000, 63 / 64
    z2 = info.communication(psi, 2, 64, 1, 2, 2, 50.0, 0.1)
    assert z2["bytes_per_gpu"] == pytest.approx(ring * psi * (2 + 2))  # reduce-scatter + all-gather, bf16
    assert z2["seconds"] == pytest.approx(z2["bytes_per_gpu"] / 50e9) and z2["comm_over_compute"] == pytest.approx(
        z2["seconds"] / 0.1)
    fp32_grads = info.communication(psi, 2, 64, 1, 4, 2, 50.0, 0.1)["bytes_per_gpu"]
    assert fp32_grads == pytest.approx(1.5 * z2["bytes_per_gpu"])  # the fp32 reduction's price
    assert info.communication(psi, 2, 64, 4, 2, 2, 50.0, 0.1)["bytes_per_gpu"] == pytest.approx(ring * psi * (8 + 2))
    assert info.communication(psi, 1, 64, 4, 2, 2, 50.0, 0.1)["bytes_per_gpu"] == pytest.approx(ring * psi * (2 + 2))
    assert info.communication(psi, 0, 64, 1, 2, 2, 50.0, 0.1)["bytes_per_gpu"] == pytest.approx(ring * psi * 4)
    assert info.communication(psi, 3, 64, 1, 2, 2, 50.0, 0.1)["bytes_per_gpu"] == pytest.approx(ring * psi * 6)
    assert info.communication(psi, 2, 1, 1, 2, 2, 50.0, 0.1)["bytes_per_gpu"] == 0
    assert info.reduce_bytes("bf16", "auto") == info.reduce_bytes("bf16-amp", "auto") == 2
    assert info.reduce_bytes("bf16", "fp32") == info.reduce_bytes("fp32", "auto") == 4


def test_cli_prints_communication_beside_compute(capsys) -> None:
    report = run_json(capsys, "--gpus", "64", "--micro-batch", "32", "--global-batch", "2048")
    comm, sp = report["communication"], report["speed"]
    assert comm["compute_seconds"] == pytest.approx(32 / sp["imgs_per_s_per_gpu"])
    assert comm["bytes_per_gpu"] == pytest.approx(63 / 64 * report["params"] * 4)  # bf16 grads + bf16 weights
    assert "assumed 50 GB/s per GPU" in comm["bandwidth_source"]
    assert info.main(["--gpus", "64", "--micro-batch", "32", "--global-batch", "2048", "--bandwidth-gbs", "25"]) == 0
    assert "at 25 GB/s (given (--bandwidth-gbs)) against" in capsys.readouterr().out


def test_text_report(capsys) -> None:
    assert info.main([*TINY, "--activation-checkpointing", "encoder"]) == 0
    text = capsys.readouterr().out
    for phrase in (
        "parameters",
        "ESTIMATE",
        "assumed 0.35",
        "h per 100K steps",
        "GPU-hours",
        "Latent extraction",
        "Gao et al. 2023",
        "sail-sg/MDT",
        "each checkpoint",
    ):
        assert phrase in text, phrase


def test_help_shows_defaults(capsys) -> None:
    assert info.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 256)" in out and "(default: MDTv2-XL/2)" in out and "(default: 500.0)" in out


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--model", "MDTv2-Q/2"], "unknown model preset"),
        (["--gpus", "0"], "--gpus"),
        (["--micro-batch", "x"], "not a number"),
        (["--mfu", "1.5"], "--mfu"),
        (["--gpu", "B200"], "not in the peak table"),
        (["--micro-batch", "5"], "global_batch"),
        (["--zero-stage", "4"], "--zero-stage"),
        ([*TINY, "--activation-checkpointing", "0,99"], "out of range"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, words, capsys) -> None:
    assert info.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, lines
    assert lines[0].startswith("mdt-info: error: ") and words in lines[0]
