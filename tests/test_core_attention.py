"""Attention with the relative position bias: the bias gathered once from its table, the three
backends (sdpa, explicit, flex) against each other, and a training forward without host syncs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mdt_ds.models import build_model
from mdt_ds.models.layers import Attention, RelativePositionBias, gather_bias
from mdt_ds.models.mdt import MDTv2, random_masking
from mdt_ds.syncs import count_host_syncs

pytestmark = pytest.mark.core

TOL = dict(atol=1e-5, rtol=1e-5)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU (torch 2.14.1); the device check runs it")


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def attention(backend: str, grid: int = 8, dim: int = 32, heads: int = 4) -> Attention:
    torch.manual_seed(0)
    attn = Attention(dim, heads, grid, backend)
    with torch.no_grad():
        attn.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
    return attn


def kept_indices(batch: int, length: int, kept: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=gen)[:kept] for _ in range(batch)])


# ----------------------------------------------------------------------------- the bias
@pytest.mark.parametrize("align", [1, 8])
def test_kept_bias_is_one_gather_of_the_table(align: int) -> None:
    rpb = RelativePositionBias(6, 3)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    full = rpb()
    assert full.shape == (3, 36, 36) and full.is_contiguous()
    ids_keep = kept_indices(2, 36, 21)
    got = rpb.kept(ids_keep, align=align)
    want = torch.stack([full[:, keep][:, :, keep] for keep in ids_keep])
    assert got.shape == (2, 3, 21, 21) and torch.equal(got, want)
    assert got.stride(-1) == 1 and got.stride(-2) % align == 0  # aligned rows, no copy needed
    assert torch.equal(gather_bias(full, ids_keep), want)
    assert rpb(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(rpb.kept(ids_keep, torch.bfloat16), want.to(torch.bfloat16))


class AllocationLog(TorchDispatchMode):
    """Records the element count of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_kept_bias_backward_allocates_nothing_batch_by_length_sized() -> None:
    """Its backward is a scatter into a table-sized buffer: no [B, H, K, L] or [B, H, L, L]
    zero buffers (the release's expand + two gathers allocate both)."""
    rpb = RelativePositionBias(8, 4)
    batch, length, kept = 4, 64, 40
    ids_keep = kept_indices(batch, length, kept)
    bias = rpb.kept(ids_keep)
    grad = torch.randn(bias.shape, generator=torch.Generator().manual_seed(1))
    log = AllocationLog()
    with log:
        bias.backward(grad)
    assert max(log.numels) < batch * 4 * kept * length
    # Same gradient as the per-sample reference.
    table = rpb.relative_position_bias_table.detach().clone().requires_grad_(True)
    full = table[rpb.relative_position_index.view(-1)].view(length, length, -1).permute(2, 0, 1)
    torch.stack([full[:, k][:, :, k] for k in ids_keep]).backward(grad)
    torch.testing.assert_close(rpb.relative_position_bias_table.grad, table.grad, atol=1e-5, rtol=1e-5)


def test_masking_is_the_release_formula() -> None:
    """random_masking builds its mask without the gather; values and kept indices unchanged."""
    gen = torch.Generator().manual_seed(0)
    for ratio in (0.3, 0.37, 0.45, 0.499):
        noise = torch.rand(3, 256, generator=gen)
        m = random_masking(noise, ratio)
        len_keep = int(256 * (1 - ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        mask = torch.ones(3, 256)
        mask[:, :len_keep] = 0
        assert torch.equal(m.ids_keep, ids_shuffle[:, :len_keep])
        assert torch.equal(m.mask, torch.gather(mask, 1, torch.argsort(ids_shuffle, dim=1)))


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", ["explicit", "flex"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_backend_forward_equals_sdpa(backend: str, masked: bool) -> None:
    sdpa, other = attention("sdpa"), attention(backend)
    other.load_state_dict(sdpa.state_dict())
    ids_keep = kept_indices(2, 64, 37) if masked else None
    x = torch.randn(2, 37 if masked else 64, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(other(x, ids_keep), sdpa(x, ids_keep), **TOL)


def sdpa_reference(attn: Attention, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
    """The layer computed with torch's SDPA itself, whatever path the layer takes."""
    q, k, v = attn.qkv_heads(x)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.bias(ids_keep), scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_training_backward_equals_torch_sdpa(backend: str) -> None:
    ref, attn = attention("sdpa"), attention(backend)
    ids_keep = kept_indices(2, 64, 37)
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(attn(x, ids_keep), sdpa_reference(ref, x, ids_keep), **TOL)
    attn(x, ids_keep).square().sum().backward()
    sdpa_reference(ref, x, ids_keep).square().sum().backward()
    for (name, a), b in zip(ref.named_parameters(), attn.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=name)


class OpLog(TorchDispatchMode):
    """Counts the aten ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


class SdpaSpy:
    """Records the attn_mask of every scaled_dot_product_attention call, then calls torch's."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.masks: list[torch.Tensor] = []
        original = F.scaled_dot_product_attention

        def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.masks.append(kwargs["attn_mask"])
            return original(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def test_training_runs_sdpa_with_aligned_bias_rows_on_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """"sdpa" is SDPA in training on a CPU too (no switch to the explicit form), with the bias
    rows padded to 8 elements as CUDA's kernels take them, and its gradients are the explicit
    form's: the branch a GPU trains is the branch this test trains."""
    spy = SdpaSpy(monkeypatch)
    sdpa, explicit = attention("sdpa"), attention("explicit")
    ids_keep = kept_indices(2, 64, 37)  # 37 % 8 != 0: the padded storage is used
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(3))
    sdpa(x, ids_keep).square().sum().backward()
    explicit(x, ids_keep).square().sum().backward()
    (mask,) = spy.masks
    assert mask.requires_grad and mask.shape == (2, 4, 37, 37) and mask.stride(-2) % 8 == 0
    for (name, a), b in zip(explicit.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=name)


class GatherDtypes(TorchDispatchMode):
    """The dtype of every aten.gather input and of every scatter (the gather's backward) output."""

    def __init__(self) -> None:
        super().__init__()
        self.gathered: list[torch.dtype] = []
        self.scattered: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "gather":
            self.gathered.append(args[0].dtype)
        elif name.startswith("scatter") or name == "gather_backward":
            self.scattered.append(out.dtype)
        return out


@pytest.mark.parametrize("compute", ["autocast", "pure-bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_bias_table_is_gathered_and_its_gradient_summed_in_fp32(compute: str, masked: bool) -> None:
    """Under bf16 compute the table is gathered in fp32 and cast afterwards, so the gather's
    backward sums each entry's logit gradients in fp32 (on CUDA a bf16 table would sum them
    with bf16 atomics: the device check measures that error). The bias SDPA gets is bf16."""
    attn = attention("sdpa")
    if compute == "pure-bf16":
        attn = attn.to(torch.bfloat16)
    ids_keep = kept_indices(2, 64, 37) if masked else None
    x = torch.randn(2, 37 if masked else 64, 32, generator=torch.Generator().manual_seed(3))
    with GatherDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "autocast"):
        out = attn(x.to(next(attn.parameters()).dtype), ids_keep)
        out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert seen.gathered and set(seen.gathered) == {torch.float32}
    assert seen.scattered and set(seen.scattered) == {torch.float32}
    table = attn.rel_pos_bias.relative_position_bias_table
    assert table.grad is not None and table.grad.dtype == table.dtype


def test_qkv_split_backward_is_one_stack() -> None:
    """q, k, v come from one unbind: its backward stacks the three gradients once. Indexing
    qkv[0], qkv[1], qkv[2] made three select_backward zero-filled [3, B, H, L, D] buffers,
    then two adds to sum them."""
    attn = attention("explicit")
    out = attn(torch.randn(2, 64, 32, requires_grad=True))
    with OpLog() as log:
        out.square().sum().backward()
    assert "aten.select_backward.default" not in log.ops and log.ops["aten.stack.default"] == 1


def test_flex_refuses_to_train_on_cpu() -> None:
    attn = attention("flex")
    x = torch.randn(1, 64, 32)
    with pytest.raises(RuntimeError, match="no backward on CPU.*sdpa"):
        attn(x)
    with pytest.raises(ValueError, match="attention must be one of"):
        Attention(32, 4, 8, "flash")


@needs_cuda
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_flex_backward_equals_sdpa_on_cuda(masked: bool) -> None:
    sdpa, flex = attention("sdpa").cuda(), attention("flex").cuda()
    flex.load_state_dict(sdpa.state_dict())
    ids_keep = kept_indices(2, 64, 37).cuda() if masked else None
    x = torch.randn(2, 37 if masked else 64, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    outs = []
    for attn in (sdpa, flex):
        out = attn(x, ids_keep)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_attention_option_reaches_every_block_and_keeps_the_state_dict() -> None:
    base = randomized(build_model("MDTv2-Tiny/2")).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 900]), torch.tensor([1, 7])
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    for backend in ("explicit", "flex"):
        model = build_model("MDTv2-Tiny/2", attention=backend).eval()
        assert model.attention == backend
        assert {b.attn.backend for b in model.blocks()} == {backend}
        assert list(model.state_dict()) == list(base.state_dict())
        model.load_state_dict(base.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), base(x, t, y), **TOL)
            got = model(x, t, y, enable_mask=True, mask_noise=noise, mask_ratio=0.4)
            torch.testing.assert_close(got, base(x, t, y, enable_mask=True, mask_noise=noise, mask_ratio=0.4), **TOL)


def test_sdpa_gets_a_contiguous_bias_in_q_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SdpaSpy(monkeypatch)
    attn = attention("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(torch.randn(2, 64, 32))
    assert spy.masks[0].shape == (1, 4, 64, 64) and spy.masks[0].is_contiguous()
    assert spy.masks[0].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- host syncs
def tiny_train() -> MDTv2:
    return randomized(build_model("MDTv2-Tiny/2")).train()


def test_training_forward_backward_has_no_host_sync() -> None:
    model = tiny_train()
    x = torch.randn(4, 4, 8, 8)
    t, y = torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    gen = torch.Generator(x.device).manual_seed(0)
    with count_host_syncs() as syncs:
        full = model(x, t, y, generator=gen)
        masked = model(x, t, y, enable_mask=True, mask_ratio=0.43, generator=gen)
        (full.square().mean() + masked.square().mean()).backward()
    assert syncs.count == 0


def test_generator_drives_every_draw_of_a_pass() -> None:
    """Token noise AND label dropout come from the given generator (the release's CPU draw of
    the dropout mask would copy it host-to-device on a GPU): the global RNG changes nothing."""
    model = randomized(build_model("MDTv2-Tiny/2", class_dropout_prob=0.5)).train()
    x = torch.randn(16, 4, 8, 8)
    t, y = torch.randint(0, 1000, (16,)), torch.randint(0, 10, (16,))
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            outs.append((model(x, t, y, generator=gen), model(x, t, y, enable_mask=True, mask_ratio=0.4, generator=gen)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    drop = model.y_embedder.token_drop(y, generator=torch.Generator().manual_seed(5))
    assert 0 < int((drop == 10).sum()) < 16  # p = 0.5 over 16 labels: some dropped, not all


def test_drawn_mask_ratio_is_a_host_draw() -> None:
    """Without a given ratio it is drawn on the host (CPU generator), never read back from the
    device: on the meta device (which cannot be read back at all) the masking still works."""
    model = build_model("MDTv2-Demo/2")  # 64 tokens, mask_ratio 0.3
    counts = set()
    for seed in range(20):
        torch.manual_seed(seed)
        m = model.draw_masking(2, torch.device("meta"))
        assert m.ids_keep.device.type == "meta"
        counts.add(m.ids_keep.shape[1])
    assert counts <= set(range(32, 45)) and len(counts) > 3  # int(64 * (1 - r)), r in [0.3, 0.5)
