"""Exact sizes of the paper's presets (built on the meta device), the release's state_dict key set,
and the analytic MAC counts (against the spec table and against torch's FlopCounterMode)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mdt_ds.models import build_model
from mdt_ds.models.flops import count_macs, count_params, train_macs_per_image

pytestmark = pytest.mark.core

PARAMS = {  # all parameters, as released (decoder blocks 6/6/4/4)
    "MDTv2-S/2": 38_454_872,
    "MDTv2-B/2": 152_112_272,
    "MDTv2-L/2": 507_015_776,
    "MDTv2-XL/2": 742_263_904,
}
# Spec table (millions): used at inference (no sideblock); paper Table 1 (no sideblock, no skip_linear).
PARAMS_M = {"MDTv2-S/2": (35.79, 33.13), "MDTv2-B/2": (141.47, 130.85), "MDTv2-XL/2": (718.34, 675.86)}
# GMACs per image at 32x32x4: full pass, masked at r = 0.3 / 0.4 / 0.5.
GMACS = {
    "MDTv2-S/2": (6.74, 6.20, 5.86, 5.54),
    "MDTv2-B/2": (25.72, 23.79, 22.51, 21.30),
    "MDTv2-XL/2": (129.49, 99.99, 88.75, 78.01),
}


@pytest.fixture(scope="module")
def meta_models():
    return {name: build_model(name, device="meta") for name in PARAMS}


def expected_keys(model) -> dict[str, tuple[int, ...]]:
    """The official release's key list (github.com/sail-sg/MDT), with shapes derived from the preset."""
    d, heads, p, c = model.hidden_size, model.num_heads, model.patch_size, model.in_channels
    length = model.x_embedder.num_patches
    grid = model.x_embedder.grid_size
    hidden = 4 * d
    keys = {
        "pos_embed": (1, length, d),
        "decoder_pos_embed": (1, length, d),
        "mask_token": (1, 1, d),
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (model.num_classes + 1, d),
        "final_layer.linear.weight": (p * p * 2 * c, d),
        "final_layer.linear.bias": (p * p * 2 * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    half = (len(model.en_inblocks) + len(model.en_outblocks)) // 2
    groups = {"en_inblocks": half, "en_outblocks": half, "de_blocks": model.decode_layer, "sideblocks": 1}
    for group, count in groups.items():
        for i in range(count):
            pre = f"{group}.{i}."
            keys.update(
                {
                    pre + "attn.qkv.weight": (3 * d, d),
                    pre + "attn.qkv.bias": (3 * d,),
                    pre + "attn.proj.weight": (d, d),
                    pre + "attn.proj.bias": (d,),
                    pre + "attn.rel_pos_bias.relative_position_bias_table": ((2 * grid - 1) ** 2 + 3, heads),
                    pre + "attn.rel_pos_bias.relative_position_index": (length, length),
                    pre + "mlp.fc1.weight": (hidden, d),
                    pre + "mlp.fc1.bias": (hidden,),
                    pre + "mlp.fc2.weight": (d, hidden),
                    pre + "mlp.fc2.bias": (d,),
                    pre + "adaLN_modulation.1.weight": (6 * d, d),
                    pre + "adaLN_modulation.1.bias": (6 * d,),
                }
            )
            if group in ("en_outblocks", "de_blocks"):
                keys[pre + "skip_linear.weight"] = (d, 2 * d)
                keys[pre + "skip_linear.bias"] = (d,)
    return keys


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(meta_models, name: str) -> None:
    model = meta_models[name]
    assert model.pos_embed.is_meta  # nothing was allocated
    counts = count_params(model)
    assert counts["all"] == PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    if name in PARAMS_M:
        inference, table1 = PARAMS_M[name]
        assert round(counts["inference"] / 1e6, 2) == inference
        assert round(counts["paper_table1"] / 1e6, 2) == table1


@pytest.mark.parametrize("name", list(PARAMS))
def test_state_dict_keys_and_shapes(meta_models, name: str) -> None:
    model = meta_models[name]
    sd = model.state_dict()
    want = expected_keys(model)
    assert set(sd) == set(want), (sorted(set(sd) - set(want)), sorted(set(want) - set(sd)))
    for key, shape in want.items():
        assert tuple(sd[key].shape) == shape, key
    index_keys = [k for k in sd if k.endswith("relative_position_index")]
    assert index_keys and all(sd[k].dtype == torch.int64 for k in index_keys)
    assert all(tuple(sd[k].shape) == (256, 256) for k in index_keys)
    blocks = {"MDTv2-S/2": (3, 6), "MDTv2-B/2": (3, 6), "MDTv2-L/2": (10, 4), "MDTv2-XL/2": (12, 4)}[name]
    assert (len(model.en_inblocks), len(model.de_blocks)) == blocks
    if name == "MDTv2-XL/2":
        assert len(sd) == 394


@pytest.mark.parametrize("name", list(GMACS))
def test_macs_match_spec_table(meta_models, name: str) -> None:
    model = meta_models[name]
    full, *masked = GMACS[name]
    assert round(count_macs(model) / 1e9, 2) == full
    for ratio, want in zip((0.3, 0.4, 0.5), masked):
        assert round(count_macs(model, ratio) / 1e9, 2) == want
    assert train_macs_per_image(model) == 3 * (count_macs(model) + count_macs(model, 0.4))
    if name == "MDTv2-XL/2":  # ~0.655 TMAC per training image (spec)
        assert round(train_macs_per_image(model) / 1e12, 3) == pytest.approx(0.655, abs=0.001)


@pytest.mark.parametrize("ratio", [None, 0.3, 0.45])
def test_macs_match_flop_counter(ratio: float | None) -> None:
    """FLOPs / 2 measured by torch (the math SDPA backend exposes q k^T and attn v as bmm) equals
    the analytic MAC count; what FlopCounterMode does not count (norms, softmax, GELU, adds) is
    elementwise, and so is what count_macs leaves out."""
    torch.manual_seed(0)
    model = build_model("MDTv2-Tiny/2").eval()
    n = 3
    x = torch.randn(n, 4, 8, 8)
    t = torch.randint(0, 1000, (n,))
    y = torch.randint(0, 10, (n,))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        if ratio is None:
            model(x, t, y)
        else:
            model(x, t, y, enable_mask=True, mask_ratio=ratio)
    measured = counter.get_total_flops() / 2 / n
    analytic = count_macs(model, ratio)
    assert measured == pytest.approx(analytic, rel=1e-3)
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert "aten.bmm" in ops  # attention matmuls were counted on both sides
