"""The typed run config: presets, JSON round trip, YAML files, dotted overrides and their errors."""

from __future__ import annotations

import json

import pytest

from mdt_ds.config import (
    MODEL_PRESETS,
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from mdt_ds.models import build_model

pytestmark = pytest.mark.core

PAPER = {  # depth, hidden, heads, decoder blocks (Gao et al. 2023, MDTv2, and the sail-sg/MDT release)
    "MDTv2-S/2": (12, 384, 6, 6),
    "MDTv2-B/2": (12, 768, 12, 6),
    "MDTv2-L/2": (24, 1024, 16, 4),
    "MDTv2-XL/2": (28, 1152, 16, 4),
}


def test_paper_presets() -> None:
    for name, (depth, hidden, heads, decode) in PAPER.items():
        cfg = ModelConfig.from_preset(name)
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.decode_layer) == (depth, hidden, heads, decode)
        assert (cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.num_classes) == (32, 2, 4, 1000)
        assert cfg.learn_sigma and cfg.preset == name


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_builds(name: str) -> None:
    cfg = ModelConfig.from_preset(name)
    small = cfg.hidden_size <= 128
    model = build_model(cfg, device=None if small else "meta")
    assert model.hidden_size == cfg.hidden_size and model.in_channels == cfg.in_channels
    assert model.num_classes == cfg.num_classes and model.decode_layer == cfg.decode_layer
    assert model.x_embedder.num_patches == (cfg.input_size // cfg.patch_size) ** 2
    assert build_model(name, device="meta", decode_layer=2).decode_layer == 2  # keyword overrides


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="MDTv2-XL/2"):
        ModelConfig.from_preset("MDTv2-XXL/2")
    with pytest.raises(ConfigError, match="MDTv2-S/2"):
        apply_overrides(TrainConfig(), ["model.preset=MDTv2-Huge/2"])


def test_json_round_trip(tmp_path) -> None:
    cfg = apply_overrides(
        TrainConfig(),
        [
            "model.preset=MDTv2-Tiny/2",
            "model.mask_ratio=null",
            "optim.lr=1e-3",
            "optim.betas=[0.9,0.99,0.999]",
            "precision=fp32",
            "zero_stage=3",
            "activation_checkpointing=encoder",
            "run_dir=/tmp/somewhere",
        ],
    )
    text = json.dumps(to_dict(cfg))
    assert from_dict(TrainConfig, json.loads(text)) == cfg
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(TrainConfig())))) == TrainConfig()
    path = tmp_path / "config.json"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert json.loads(path.read_text()) == to_dict(cfg)


def test_yaml_file(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "# a run file\n"
        "model:\n  preset: MDTv2-Demo/2\n  decode_layer: 4\n"
        "optim:\n  name: adamw\n  lr: 0.002\n"
        "precision: fp32\nglobal_batch: 64\n"
    )
    cfg = load_config(path)
    assert cfg.model.preset == "MDTv2-Demo/2" and cfg.model.hidden_size == 128 and cfg.model.decode_layer == 4
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 0.002 and cfg.precision == "fp32"
    assert cfg.global_batch == 64 and cfg.optim.eps == 1e-8  # defaults fill the rest
    # Overrides go on top of the file.
    cfg = load_config(path, ["optim.lr=5e-4", "model.depth=8"])
    assert cfg.optim.lr == 5e-4 and cfg.model.depth == 8 and cfg.model.hidden_size == 128


def test_yaml_exponent_floats(tmp_path) -> None:
    """PyYAML reads ``3e-4`` (no dot) as a string; a float field must still accept it."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  eps: 1e-8\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.eps == pytest.approx(1e-8)


def test_file_errors(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lrate") as err:
        load_config(bad)
    assert "lr" in str(err.value) and "weight_decay" in str(err.value)  # the allowed keys
    bad.write_text("steps: many\n")
    with pytest.raises(ConfigError, match="steps"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_override_types() -> None:
    cfg = apply_overrides(TrainConfig(), ["optim.lr=3e-4", "--steps=10", "optim.weight_decay=0", "ema_warmup=true"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4
    assert cfg.steps == 10 and isinstance(cfg.steps, int)
    assert isinstance(cfg.optim.weight_decay, float) and cfg.optim.weight_decay == 0.0  # int -> float
    assert cfg.ema_warmup is True
    cfg = apply_overrides(TrainConfig(), ["model.mask_ratio=null", "optim.betas=[0.9,0.95,0.99]"])
    assert cfg.model.mask_ratio is None and cfg.optim.betas == [0.9, 0.95, 0.99]


def test_override_numeric_text_for_string_fields() -> None:
    """A number typed on the command line for a str field is that text (``run_dir=2026``), and
    an int field takes the number (``diffusion.sample_steps=250``), not other text."""
    cfg = apply_overrides(TrainConfig(), ["run_dir=2026", "diffusion.sample_steps=250"])
    assert cfg.run_dir == "2026" and cfg.diffusion.sample_steps == 250
    with pytest.raises(ConfigError, match="sample_steps"):
        apply_overrides(TrainConfig(), ["diffusion.sample_steps=ddim50"])


def test_override_bad_choice_names_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), ["precision=bf17"])
    msg = str(err.value)
    assert "precision" in msg and "bf17" in msg and all(v in msg for v in ("bf16", "fp16", "fp32"))
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        apply_overrides(TrainConfig(), ["activation_checkpointing=some"])


@pytest.mark.parametrize("override", ["zero_stage=true", "zero_stage=2.0", "zero_stage=4"])
def test_override_literal_int_is_strict(override: str) -> None:
    """True == 1 and 2.0 == 2 in Python; a ZeRO stage must still be one of the ints 0-3."""
    with pytest.raises(ConfigError, match="zero_stage"):
        apply_overrides(TrainConfig(), [override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=fast", "optim.lr"),
        ("steps=1.5", "steps"),
        ("steps=true", "steps"),
        ("ema_warmup=1", "ema_warmup"),
        ("optim.betas=0.9", "optim.betas"),
        ("model.depth=deep", "model.depth"),
    ],
)
def test_override_wrong_type(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(TrainConfig(), [override])


def test_override_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), ["optim.lrr=0.1"])
    msg = str(err.value)
    assert "optim.lrr" in msg and "lr" in msg and "betas" in msg and "weight_decay" in msg
    with pytest.raises(ConfigError, match="learning_rate"):
        apply_overrides(TrainConfig(), ["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="optimizer"):
        apply_overrides(TrainConfig(), ["optimizer.lr=0.1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(TrainConfig(), ["optim.lr"])


def test_model_preset_override_resets_model_then_applies_model_overrides() -> None:
    start = apply_overrides(TrainConfig(), ["model.hidden_size=96", "model.num_heads=3", "optim.lr=1e-3"])
    cfg = apply_overrides(start, ["model.depth=8", "model.preset=MDTv2-B/2"])  # order on the line does not matter
    assert cfg.model.preset == "MDTv2-B/2"
    assert cfg.model.hidden_size == 768 and cfg.model.num_heads == 12  # reset to the preset
    assert cfg.model.depth == 8  # the later model override applies on top
    assert cfg.optim.lr == 1e-3  # other sections untouched
    assert cfg.model == ModelConfig.from_preset("MDTv2-B/2", depth=8)


def test_model_kwargs_build_the_release_constructor() -> None:
    cfg = ModelConfig.from_preset("MDTv2-Tiny/2", mask_ratio=0.4)
    kwargs = cfg.model_kwargs()
    assert "preset" not in kwargs
    assert set(kwargs) == {
        "input_size",
        "patch_size",
        "in_channels",
        "hidden_size",
        "depth",
        "num_heads",
        "mlp_ratio",
        "class_dropout_prob",
        "num_classes",
        "learn_sigma",
        "mask_ratio",
        "decode_layer",
        "attention",
    }
    assert build_model(cfg).mask_ratio == 0.4


@pytest.mark.parametrize(
    "value,scope",
    [("none", "none"), ("all", "all"), ("encoder", "encoder"), (3, [0, 1, 2]), ("3", [0, 1, 2]),
     ("5,0,2", [0, 2, 5]), ("[1, 4]", [1, 4]), (0, [])],
)
def test_activation_checkpointing_takes_a_scope_a_count_or_block_indices(value, scope) -> None:
    from mdt_ds.config import checkpointing_scope

    assert checkpointing_scope(value) == scope
    cfg = apply_overrides(TrainConfig(), [f"activation_checkpointing={value}"])
    assert checkpointing_scope(cfg.activation_checkpointing) == scope


def test_activation_checkpointing_from_a_yaml_int_and_bad_values(tmp_path) -> None:
    from mdt_ds.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("activation_checkpointing: 12\nstop_check_every: 5\n")
    cfg = load_config(path)
    assert cfg.activation_checkpointing == 12 and cfg.stop_check_every == 5
    for bad in ("decoder", "1,x", "-2"):
        with pytest.raises(ConfigError, match="activation_checkpointing"):
            apply_overrides(TrainConfig(), [f"activation_checkpointing={bad}"])
    with pytest.raises(ConfigError, match="stop_check_every"):
        apply_overrides(TrainConfig(), ["stop_check_every=0"])


@pytest.mark.parametrize("value", ["auto", "fp32", "bf16", "fp16"])
def test_grad_reduce_dtype_sets_deepspeeds_communication_dtype(value: str) -> None:
    from mdt_ds.config import deepspeed_config

    cfg = apply_overrides(TrainConfig(), ["precision=bf16", "zero_stage=2", "global_batch=8", f"grad_reduce_dtype={value}"])
    ds = deepspeed_config(cfg, world_size=2)
    if value == "auto":  # DeepSpeed's default: reduce in the training precision
        assert "communication_data_type" not in ds
    else:
        assert ds["communication_data_type"] == value
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2


def test_grad_reduce_dtype_conflicting_with_a_deepspeed_knob_is_refused() -> None:
    from mdt_ds.config import deepspeed_config

    cfg = TrainConfig(global_batch=8, grad_reduce_dtype="fp32", deepspeed={"communication_data_type": "bf16"})
    with pytest.raises(ConfigError, match="communication_data_type='bf16' contradicts grad_reduce_dtype='fp32'"):
        deepspeed_config(cfg, world_size=1)
    same = TrainConfig(global_batch=8, grad_reduce_dtype="fp32", deepspeed={"communication_data_type": "fp32"})
    assert deepspeed_config(same, world_size=1)["communication_data_type"] == "fp32"
    kept = TrainConfig(global_batch=8, deepspeed={"communication_data_type": "fp32"})  # auto keeps the knob
    assert deepspeed_config(kept, world_size=1)["communication_data_type"] == "fp32"


def test_zero_offload_is_refused_in_one_line() -> None:
    """Offloaded fp32 fragments live on the host, where the EMA's NCCL collectives would fail."""
    from mdt_ds.config import deepspeed_config

    for key in ("offload_optimizer", "offload_param"):
        cfg = TrainConfig(global_batch=8, zero_stage=3, deepspeed={"zero_optimization": {key: {"device": "cpu"}}})
        with pytest.raises(ConfigError, match=f"zero_optimization.{key} is not supported"):
            deepspeed_config(cfg, world_size=1)
    off = TrainConfig(global_batch=8, deepspeed={"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert deepspeed_config(off, world_size=1)["zero_optimization"]["offload_optimizer"] == {"device": "none"}


def derived(*overrides: str, world_size: int = 2) -> dict:
    from mdt_ds.config import deepspeed_config

    return deepspeed_config(apply_overrides(TrainConfig(), ["global_batch=16", *overrides]), world_size=world_size)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_low_precision_gradients_accumulate_in_fp32_over_micro_steps(precision: str, stage: int) -> None:
    """DeepSpeed accumulates in the parameter dtype unless told: bf16 sums over micro-steps."""
    one = derived(f"precision={precision}", f"zero_stage={stage}")  # 16 = 8 x 1 x 2
    assert one["gradient_accumulation_steps"] == 1 and "data_types" not in one
    many = derived(f"precision={precision}", f"zero_stage={stage}", "micro_batch=2")  # 16 = 2 x 4 x 2
    assert many["gradient_accumulation_steps"] == 4 and many["data_types"] == {"grad_accum_dtype": "fp32"}
    for fp32_params in ("fp32", "bf16-amp"):  # fp32 parameters accumulate in fp32 already
        assert "data_types" not in derived(f"precision={fp32_params}", f"zero_stage={stage}", "micro_batch=2")


def test_zero0_low_precision_accumulation_and_a_hand_set_dtype_are_refused() -> None:
    with pytest.raises(ConfigError, match="zero_stage=0 would accumulate gradients over 4 micro-steps in bf16"):
        derived("precision=bf16", "zero_stage=0", "micro_batch=2")
    assert "data_types" not in derived("precision=bf16", "zero_stage=0")  # no accumulation: fine
    with pytest.raises(ConfigError, match="data_types is derived"):
        derived("precision=bf16", 'deepspeed={"data_types": {"grad_accum_dtype": "bf16"}}')


def test_bf16_amp_keeps_fp32_parameters_under_deepspeeds_autocast() -> None:
    ds = derived("precision=bf16-amp")
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # Linear/Conv reduce in bf16
    assert "communication_data_type" not in ds  # DeepSpeed ignores it under autocast
    fp32 = derived("precision=bf16-amp", "grad_reduce_dtype=fp32")
    assert fp32["torch_autocast"]["lower_precision_safe_modules"] == []  # every gradient reduces in fp32
    with pytest.raises(ConfigError, match="grad_reduce_dtype='fp16' does not go with precision='bf16-amp'"):
        derived("precision=bf16-amp", "grad_reduce_dtype=fp16")
    with pytest.raises(ConfigError, match="deepspeed.torch_autocast is derived"):
        derived("precision=bf16-amp", 'deepspeed={"torch_autocast": {"dtype": "float16"}}')


def test_communication_settings_are_derived_from_the_comm_section() -> None:
    zero = derived()["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    assert zero["overlap_comm"] is True and zero["use_multi_rank_bucket_allreduce"] is False
    zero = derived("comm.reduce_bucket_size=20000000", "comm.overlap_comm=false")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 20_000_000 and zero["overlap_comm"] is False
    with pytest.raises(ConfigError, match="reduce_bucket_size is derived from comm.reduce_bucket_size"):
        derived('deepspeed={"zero_optimization": {"reduce_bucket_size": 5}}')
    with pytest.raises(ConfigError, match="comm.timeout_min must be > 0"):
        apply_overrides(TrainConfig(), ["comm.timeout_min=0"])
    from mdt_ds.dist import DEFAULT_TIMEOUT_MIN

    assert TrainConfig().comm.timeout_min == DEFAULT_TIMEOUT_MIN == 60


def test_compile_with_zero3_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="compile=true with zero_stage=3 is not supported"):
        apply_overrides(TrainConfig(), ["compile=true", "zero_stage=3"])
    assert apply_overrides(TrainConfig(), ["compile=true", "zero_stage=2"]).compile


def test_a_key_without_its_section_is_pointed_to_it(tmp_path) -> None:
    """`mdt-train lr=1e-3` listed the 36 top-level keys; a key that is the leaf of exactly one
    section (or a top-level key given under a section) now says where it lives."""
    for override, message in (("lr=1e-3", "unknown key lr; did you mean optim.lr?"),
                              ("cfg_scale=2", "unknown key cfg_scale; did you mean diffusion.cfg_scale?"),
                              ("optim.seed=1", "unknown key optim.seed; did you mean seed?")):
        with pytest.raises(ConfigError) as err:
            apply_overrides(TrainConfig(), [override])
        assert str(err.value) == message
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"^unknown key lr; did you mean optim.lr\?$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^unknown key optim.lrate; allowed keys: \['betas'"):
        apply_overrides(TrainConfig(), ["optim.lrate=1"])  # no field of that name anywhere: the list
