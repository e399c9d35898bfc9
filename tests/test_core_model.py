"""MDTv2 model: forward/backward, masking, classifier-free guidance, attention with the relative
position bias, position embeddings and activation checkpointing (all on tiny models, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mdt_ds.config import MODEL_PRESETS, checkpointing_scope
from mdt_ds.diffusion import create_diffusion
from mdt_ds.diffusion.loss import MDTv2Loss
from mdt_ds.models import build_model
from mdt_ds.models.checkpointing import apply_activation_checkpointing
from mdt_ds.models.guidance import guide_eps, guided_channel_count, power_cosine_scale
from mdt_ds.models.layers import (
    Attention,
    RelativePositionBias,
    gather_bias,
    get_2d_sincos_pos_embed,
    relative_position_index,
)
from mdt_ds.models.mdt import MDTv2, random_masking

pytestmark = pytest.mark.core


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Replace every parameter with N(0, std^2): the release init zeroes the adaLN and final
    layers, which would make every output (and most gradients) exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny(seed: int = 0, **overrides) -> MDTv2:
    return randomize(build_model("MDTv2-Tiny/2", **overrides), seed)


def inputs(model: MDTv2, n: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = model.input_size
    x = torch.randn(n, model.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, model.num_classes, (n,), generator=gen)
    return x, t, y


# ----------------------------------------------------------------------------- forward/backward
CUSTOM = dict(  # any input size / channel count / class count; odd depth - decode_layer
    input_size=12,
    patch_size=2,
    in_channels=3,
    num_classes=7,
    depth=4,
    hidden_size=32,
    num_heads=2,
    decode_layer=1,
    learn_sigma=False,
)


@pytest.mark.parametrize("name", ["MDTv2-Tiny/2", "MDTv2-Demo/2", "custom"])
@pytest.mark.parametrize("enable_mask", [False, True], ids=["full", "masked"])
def test_forward_backward(name: str, enable_mask: bool) -> None:
    if name == "custom":
        model = randomize(MDTv2(mask_ratio=0.3, **CUSTOM))
        assert len(model.en_inblocks) == len(model.en_outblocks) == 1  # (4 - 1) // 2, as released
    else:
        model = randomize(build_model(name))
        cfg = MODEL_PRESETS[name]
        assert model.in_channels == cfg["in_channels"] and model.num_classes == cfg["num_classes"]
    model.train()
    x, t, y = inputs(model, n=3)
    out = model(x, t, y, enable_mask=enable_mask)
    channels = model.in_channels * (1 if name == "custom" else 2)
    assert out.shape == (3, channels, model.input_size, model.input_size)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        unused = not enable_mask and (pname.startswith("sideblocks.") or pname == "mask_token")
        if unused:
            assert p.grad is None, f"{pname} should not take part in the full pass"
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"


def test_eval_forward_is_deterministic_and_batch_independent() -> None:
    model = tiny().eval()
    x, t, y = inputs(model, n=4)
    with torch.no_grad():
        out = model(x, t, y)
        again = model(x, t, y)
        single = model(x[1:2], t[1:2], y[1:2])
    assert torch.equal(out, again)
    torch.testing.assert_close(out[1:2], single, atol=1e-5, rtol=1e-5)


def test_label_dropout_uses_null_class() -> None:
    model = tiny().eval()
    x, t, y = inputs(model, n=2)
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        forced = model(x, t, y, force_drop_ids=torch.ones_like(y))
        explicit = model(x, t, null)
    torch.testing.assert_close(forced, explicit, atol=0, rtol=0)
    assert model.y_embedder.embedding_table.num_embeddings == model.num_classes + 1


# ----------------------------------------------------------------------------- masking
def test_masked_pass_with_generator_is_reproducible() -> None:
    model = tiny().eval()
    x, t, y = inputs(model, n=3)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(7))
        b = model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(7))
        c = model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), state), "an explicit generator must leave the global RNG alone"


def test_masked_pass_with_given_noise_is_reproducible() -> None:
    model = tiny().eval()
    x, t, y = inputs(model, n=2)
    noise = torch.rand(2, model.x_embedder.num_patches, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(x, t, y, enable_mask=True, mask_noise=noise, mask_ratio=0.4)
        b = model(x, t, y, enable_mask=True, mask_noise=noise.clone(), mask_ratio=0.4)
    assert torch.equal(a, b)


def test_mask_ratio_range_and_masking_consistency() -> None:
    model = randomize(build_model("MDTv2-Demo/2"))  # 64 tokens, mask_ratio 0.3
    length = model.x_embedder.num_patches
    allowed = {int(length * (1 - r)) for r in torch.linspace(0.3, 0.49999, 2001).tolist()}
    kept_seen = set()
    for seed in range(200):
        m = model.draw_masking(3, torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
        kept = m.ids_keep.shape[1]
        kept_seen.add(kept)
        assert kept in allowed
        assert torch.equal(m.mask.sum(1), torch.full((3,), float(length - kept)))
        assert (m.mask.gather(1, m.ids_keep) == 0).all()
        ids_shuffle = torch.argsort(m.ids_restore, dim=1)
        assert torch.equal(ids_shuffle[:, :kept], m.ids_keep)
    assert min(kept_seen) <= min(allowed) + 1 and max(kept_seen) >= max(allowed) - 1  # [0.3, 0.5) covered


def test_random_masking_keeps_lowest_noise() -> None:
    noise = torch.rand(4, 256, generator=torch.Generator().manual_seed(0))
    m = random_masking(noise, 0.35)
    assert m.ids_keep.shape == (4, int(256 * (1 - 0.35)))
    kept_noise = noise.gather(1, m.ids_keep)
    dropped = noise.masked_fill(m.mask == 0, float("inf")).min(1).values
    assert (kept_noise.max(1).values < dropped).all()


def test_model_without_mask_ratio() -> None:
    model = tiny(mask_ratio=None).eval()
    assert not model.mask_token.requires_grad
    assert set(model.state_dict()) == set(tiny().state_dict())
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="mask_ratio"):
        model(x, t, y, enable_mask=True)
    assert model(x, t, y, enable_mask=True, mask_ratio=0.5).shape == (2, 8, 8, 8)


# ----------------------------------------------------------------------------- guidance
def cfg_batch(model: MDTv2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = model.input_size
    z = torch.randn(2, model.in_channels, size, size, generator=gen)
    labels = torch.tensor([1, 2])
    null = torch.full_like(labels, model.num_classes)
    tt = torch.tensor([10, 500])
    return z, tt, labels, torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([labels, null])


@pytest.mark.parametrize("guide", ["release", "all"])
def test_forward_with_cfg_scale_one_is_conditional(guide: str) -> None:
    model = tiny().eval()
    z, tt, labels, x, t, y = cfg_batch(model)
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=1.0, guide_channels=guide)
        cond = model(z, tt, labels)
    assert out.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out[:2], cond, atol=1e-5, rtol=1e-5)
    n = guided_channel_count(4, guide)
    assert torch.equal(out[:2, :n], out[2:, :n])  # the guided eps is returned for both halves


def test_forward_with_cfg_none_is_plain_forward() -> None:
    model = tiny().eval()
    _, _, _, x, t, y = cfg_batch(model)
    x = x.clone()
    x[2:] += 1  # None must not even assume the halves are equal
    with torch.no_grad():
        assert torch.equal(model.forward_with_cfg(x, t, y, cfg_scale=None), model(x, t, y))


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("guide", ["release", "all"])
def test_guide_channels_never_touch_variance(channels: int, guide: str) -> None:
    model = tiny(in_channels=channels).eval()
    z, tt, labels, x, t, y = cfg_batch(model)
    scale = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=scale, guide_channels=guide)
        raw = model(x, t, y)  # the same doubled batch, unguided
    n = min(3, channels) if guide == "release" else channels
    assert guided_channel_count(channels, guide) == n
    w = power_cosine_scale(tt, scale).view(-1, 1, 1, 1)
    guided = raw[2:, :n] + w * (raw[:2, :n] - raw[2:, :n])
    torch.testing.assert_close(out[:2, :n], guided, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[2:, :n], guided, atol=1e-6, rtol=1e-6)
    # Unguided channels (the remaining eps channels, and always the variance channels): as produced.
    torch.testing.assert_close(out[:, n:], raw[:, n:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[:2, channels:], out[2:, channels:])  # variance differs per half
    assert not torch.allclose(out[:2, :n], raw[:2, :n], atol=1e-4)  # guidance did something


def test_guide_eps_unit() -> None:
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(4, 2, 3, 3, generator=gen)  # C = 1: eps channel 0, variance channel 1
    t = torch.tensor([0, 999, 0, 999])
    res = guide_eps(out, t, 3.0, latent_channels=1)
    w = power_cosine_scale(t[:2], 3.0).view(-1, 1, 1, 1)
    g = out[2:, :1] + w * (out[:2, :1] - out[2:, :1])
    torch.testing.assert_close(res[:, :1], torch.cat([g, g]))
    assert torch.equal(res[:, 1:], out[:, 1:])
    with pytest.raises(ValueError, match="guide_channels"):
        guide_eps(out, t, 3.0, latent_channels=1, guide_channels="some")


@pytest.mark.parametrize("scale,power", [(3.8, 4.0), (1.5, 1.0), (1.0, 4.0)])
def test_power_cosine_scale_closed_form(scale: float, power: float) -> None:
    ts = [0, 1, 100, 250, 500, 750, 999, 1000]
    got = power_cosine_scale(torch.tensor(ts), scale, 1000, power)
    want = [1 + (scale - 1) * (1 - math.cos(math.pi * (1 - t / 1000) ** power)) / 2 for t in ts]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=1e-6, check_dtype=False)
    assert got[0].item() == pytest.approx(scale) and got[-1].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- attention
def explicit_bias(table: torch.Tensor, grid: int) -> torch.Tensor:
    """B[h, i, j] = table[(dr + g - 1) * (2g - 1) + (dc + g - 1), h] written out element by element."""
    length = grid * grid
    rows = torch.arange(length) // grid
    cols = torch.arange(length) % grid
    index = (rows[:, None] - rows[None, :] + grid - 1) * (2 * grid - 1) + (cols[:, None] - cols[None, :] + grid - 1)
    return table[index].permute(2, 0, 1)


def explicit_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """proj(softmax(q k^T * head_dim^-0.5 + B) v), heads re-joined as the release does."""
    q, k, v = attn.qkv_heads(x)
    weights = torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim**-0.5 + bias, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape)
    return attn.proj(out)


def make_attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(64, 4, grid=16)
    with torch.no_grad():
        attn.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
    return attn


def test_sdpa_equals_explicit_attention() -> None:
    attn = make_attention()
    x = torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(1))
    bias = explicit_bias(attn.rel_pos_bias.relative_position_bias_table, 16)
    with torch.no_grad():
        got = attn(x)
        want = explicit_attention(attn, x, bias)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # Also against a float64 computation: fp32 rounding only.
    attn64 = copy.deepcopy(attn).double()
    with torch.no_grad():
        want64 = explicit_attention(attn64, x.double(), bias.double())
    torch.testing.assert_close(got.double(), want64, atol=2e-6, rtol=1e-5)


def test_attention_under_bf16_autocast() -> None:
    attn = make_attention()
    x = torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.no_grad():
        ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
        ids_keep = torch.stack([torch.randperm(256)[:100] for _ in range(2)])
        out_masked = attn(x[:, :100], ids_keep)
    assert out.dtype == torch.bfloat16 and out_masked.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(out_masked).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    (out.float().sum() + out_masked.float().sum()).backward()
    assert torch.isfinite(attn.rel_pos_bias.relative_position_bias_table.grad).all()


@pytest.mark.parametrize("enable_mask", [False, True], ids=["full", "masked"])
def test_model_under_bf16_autocast(enable_mask: bool) -> None:
    model = tiny().train()
    x, t, y = inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, enable_mask=enable_mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gathered_bias_equals_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, length, kept = 3, 16, 9
    bias = torch.randn(heads, length, length, generator=gen)
    ids_keep = torch.stack([torch.randperm(length, generator=gen)[:kept] for _ in range(2)])
    got = gather_bias(bias, ids_keep)
    want = torch.empty(2, heads, kept, kept)
    for b in range(2):
        for h in range(heads):
            for i in range(kept):
                for j in range(kept):
                    want[b, h, i, j] = bias[h, ids_keep[b, i], ids_keep[b, j]]
    assert torch.equal(got, want)


def test_masked_attention_equals_attention_over_kept_tokens() -> None:
    attn = make_attention()
    gen = torch.Generator().manual_seed(2)
    kept = 166
    ids_keep = torch.stack([torch.randperm(256, generator=gen)[:kept] for _ in range(2)])
    x_full = torch.randn(2, 256, 64, generator=gen)
    x_kept = torch.gather(x_full, 1, ids_keep[..., None].expand(-1, -1, 64))
    full_bias = explicit_bias(attn.rel_pos_bias.relative_position_bias_table, 16)
    with torch.no_grad():
        got = attn(x_kept, ids_keep)
        for b in range(2):
            keep = ids_keep[b]
            bias_b = full_bias[:, keep][:, :, keep]  # bias between the kept tokens' original positions
            want = explicit_attention(attn, x_kept[b : b + 1], bias_b)
            torch.testing.assert_close(got[b : b + 1], want, atol=2e-6, rtol=1e-5)


def test_relative_position_index_formula() -> None:
    index = relative_position_index(16)
    assert index.shape == (256, 256) and index.dtype == torch.int64
    for i in range(0, 256, 7):
        for j in range(0, 256, 5):
            dr, dc = i // 16 - j // 16, i % 16 - j % 16
            assert index[i, j].item() == (dr + 15) * 31 + (dc + 15)
    assert index.min().item() == 0 and index.max().item() == 31 * 31 - 1
    assert (index.diagonal() == 15 * 31 + 15).all()
    rpb = RelativePositionBias(16, 6)
    assert rpb.relative_position_bias_table.shape == (964, 6)  # (2*16-1)^2 + 3 cls slots
    assert torch.equal(rpb.relative_position_index, index)
    assert "relative_position_index" in rpb.state_dict()  # a persistent buffer, as released
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    torch.testing.assert_close(rpb(), explicit_bias(rpb.relative_position_bias_table, 16), atol=0, rtol=0)


def test_2d_sincos_layout() -> None:
    dim, grid = 32, 4
    emb = get_2d_sincos_pos_embed(dim, grid)
    assert emb.shape == (grid * grid, dim)
    quarter = dim // 4
    omega = [1.0 / 10000 ** (2 * i / (dim / 2)) for i in range(quarter)]
    for row in range(grid):
        for col in range(grid):
            token = row * grid + col
            for i, w in enumerate(omega):
                assert emb[token, i].item() == pytest.approx(math.sin(col * w), abs=1e-6)
                assert emb[token, quarter + i].item() == pytest.approx(math.cos(col * w), abs=1e-6)
                assert emb[token, 2 * quarter + i].item() == pytest.approx(math.sin(row * w), abs=1e-6)
                assert emb[token, 3 * quarter + i].item() == pytest.approx(math.cos(row * w), abs=1e-6)
    model = build_model("MDTv2-Tiny/2")  # fresh init: both position embeddings are the sin-cos table
    want = get_2d_sincos_pos_embed(model.hidden_size, model.x_embedder.grid_size)[None]
    assert torch.equal(model.pos_embed.data, want) and torch.equal(model.decoder_pos_embed.data, want)


def test_release_init_zeroes_adaln_and_final_layer() -> None:
    model = build_model("MDTv2-Tiny/2")
    for block in model.blocks():
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
    assert not model.final_layer.linear.weight.any()
    x, t, y = inputs(model)
    with torch.no_grad():
        assert not model(x, t, y).any()  # adaLN-Zero: a fresh model predicts zero


# ----------------------------------------------------------------------------- checkpointing
def loss_and_grads(model: MDTv2):
    torch.manual_seed(0)  # label dropout and the mask draw use the global generator
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    y = torch.randint(0, 10, (3,), generator=gen)
    model.zero_grad(set_to_none=True)
    loss, _ = MDTv2Loss(create_diffusion(""))(model, x0, y, generator=gen)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scope", ["encoder", "all"])
def test_activation_checkpointing_changes_nothing(scope: str) -> None:
    model = tiny().train()
    loss_ref, grads_ref = loss_and_grads(model)
    wrapped = copy.deepcopy(model)
    calls = []

    def counting_checkpoint(fn, *args):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    count = apply_activation_checkpointing(wrapped, scope, counting_checkpoint)
    encoder = len(model.en_inblocks) + len(model.en_outblocks)
    assert count == (encoder if scope == "encoder" else len(model.blocks()))
    assert apply_activation_checkpointing(wrapped, scope, counting_checkpoint) == count  # idempotent
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in model.named_parameters()]

    loss, grads = loss_and_grads(wrapped)
    per_pass = len(model.de_blocks) + encoder
    assert len(calls) == (2 * encoder if scope == "encoder" else 2 * per_pass + len(model.sideblocks))
    torch.testing.assert_close(loss, loss_ref, atol=0, rtol=0)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-7, rtol=1e-6, msg=name)

    calls.clear()
    wrapped.eval()
    with torch.no_grad():
        x, t, y = inputs(model)
        torch.testing.assert_close(wrapped(x, t, y), model.eval()(x, t, y), atol=0, rtol=0)
    assert not calls  # no recomputation machinery outside training


def test_checkpointed_model_deepcopies_with_its_own_weights() -> None:
    """An EMA copy made with copy.deepcopy after checkpointing was applied must run its own
    weights, not the source model's (a closure over the block would keep the source's)."""
    model = tiny().train()
    apply_activation_checkpointing(model, "all")
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(1.5)
    plain = tiny()
    plain.load_state_dict(ema.state_dict())
    x, t, y = inputs(model)
    for mode in ("eval", "train"):
        getattr(ema, mode)()
        getattr(plain, mode)()
        torch.manual_seed(0)
        got = ema(x, t, y, force_drop_ids=torch.zeros_like(y))
        torch.manual_seed(0)
        want = plain(x, t, y, force_drop_ids=torch.zeros_like(y))
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=mode)


def test_checkpointing_rejects_unknown_scope() -> None:
    with pytest.raises(ValueError, match="encoder"):
        apply_activation_checkpointing(tiny(), "decoder")  # type: ignore[arg-type]


def test_sdpa_is_what_attention_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny().eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        model(x, t, y)
    assert len(calls) == len(model.en_inblocks) + len(model.en_outblocks) + len(model.de_blocks)
    assert all(m is not None and m.is_floating_point() for m in calls)


@pytest.mark.parametrize("scope", [2, "1,3"], ids=["count", "list"])
def test_activation_checkpointing_by_blocks(scope) -> None:
    """A block count N wraps the first N blocks of MDTv2.blocks(); a list wraps exactly those
    indices; losses and grads are unchanged."""
    model = tiny().train()
    loss_ref, grads_ref = loss_and_grads(model)
    wrapped = copy.deepcopy(model)
    indices = checkpointing_scope(scope)
    assert apply_activation_checkpointing(wrapped, indices) == len(indices)
    flags = [getattr(b, "_mdt_checkpointed", False) for b in wrapped.blocks()]
    assert [i for i, f in enumerate(flags) if f] == ([0, 1] if scope == 2 else [1, 3])
    loss, grads = loss_and_grads(wrapped)
    torch.testing.assert_close(loss, loss_ref, atol=0, rtol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-7, rtol=1e-6, msg=name)


def test_checkpointing_rejects_out_of_range_blocks() -> None:
    model = tiny()
    count = len(model.blocks())
    with pytest.raises(ValueError, match=f"has {count} blocks"):
        apply_activation_checkpointing(model, checkpointing_scope(count + 1))
    with pytest.raises(ValueError, match=f"\\[{count}\\].*has {count} blocks"):
        apply_activation_checkpointing(model, [0, count])
    assert not any(getattr(b, "_mdt_checkpointed", False) for b in model.blocks())  # checked first
