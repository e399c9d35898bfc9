"""Analytic multiply-accumulate (MAC) counts of MDTv2 per image.

Unit: MACs. The DiT/MDT papers' "GFLOPs" are in fact GMACs (one multiply-add = 1); hardware
FLOP/s count 2 per MAC, so ``MFU = 2 x MACs/image x images/s / peak FLOP/s``. Counted: every
matmul and conv (linear layers, q k^T and attn v); not counted: norms, softmax, activations,
elementwise ops (under 1% at these sizes).
"""

from __future__ import annotations

from mdt_ds.models.mdt import MDTv2


def _block_macs(tokens: int, dim: int, mlp_hidden: int, skip: bool) -> int:
    macs = 6 * dim * dim  # adaLN modulation (once per image)
    macs += tokens * (3 * dim * dim + dim * dim + 2 * dim * mlp_hidden)  # qkv, proj, mlp
    macs += 2 * tokens * tokens * dim  # q k^T and attn v
    if skip:
        macs += tokens * 2 * dim * dim  # skip_linear
    return macs


def count_macs(model: MDTv2, mask_ratio: float | None = None) -> int:
    """Forward MACs per image: the full pass (``mask_ratio=None``) or the masked training pass
    at a fixed ratio (encoder on the kept tokens, side-interpolator and decoder on all)."""
    dim = model.hidden_size
    mlp_hidden = model.sideblocks[0].mlp.fc1.out_features
    length = model.x_embedder.num_patches
    kept = length if mask_ratio is None else int(length * (1 - mask_ratio))
    p, c_in = model.patch_size, model.in_channels
    macs = length * c_in * p * p * dim  # patch embedding
    macs += model.t_embedder.frequency_embedding_size * dim + dim * dim  # timestep MLP
    macs += sum(_block_macs(kept, dim, mlp_hidden, False) for _ in model.en_inblocks)
    macs += sum(_block_macs(kept, dim, mlp_hidden, True) for _ in model.en_outblocks)
    if mask_ratio is not None:
        macs += _block_macs(length, dim, mlp_hidden, False)  # side-interpolator
    macs += sum(_block_macs(length, dim, mlp_hidden, True) for _ in model.de_blocks)
    macs += 2 * dim * dim + length * dim * p * p * model.out_channels  # final layer
    return macs


def train_macs_per_image(model: MDTv2, mask_ratio: float = 0.4) -> int:
    """MACs of one training image: forward + backward (~2x forward) of the full and the masked
    pass, i.e. ``3 x (full + masked)``. 0.4 is the mean of the release's ratio range."""
    return 3 * (count_macs(model) + count_macs(model, mask_ratio))


def count_params(model: MDTv2) -> dict[str, int]:
    """Parameter counts: all, used at inference (no side block), and the paper's Table 1 count
    (no side block and no v2 skip_linear layers)."""
    total = sum(p.numel() for p in model.parameters())
    side = sum(p.numel() for p in model.sideblocks.parameters())
    skips = sum(
        p.numel() for b in model.blocks() if b.skip_linear is not None for p in b.skip_linear.parameters()
    )
    return {"all": total, "inference": total - side, "paper_table1": total - side - skips}
