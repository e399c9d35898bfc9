"""Building blocks of MDTv2, written to match the official release (sail-sg/MDT 7d26c21).

Every module name here maps one-to-one onto a state_dict key of the released checkpoints
(`attn.qkv`, `attn.rel_pos_bias.relative_position_bias_table`, `mlp.fc1`, `adaLN_modulation.1`,
`skip_linear`, ...), so official weights load with ``strict=True``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT): per-sample shift and scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Conv patchify, flattened row-major into tokens (key `x_embedder.proj`)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens: the transposed conv output would give the full pass's first block
        # (and the decoder's input shortcut) other strides than the rest, hence extra graphs
        # under torch.compile and strided elementwise kernels in eager.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep embedding ([cos, sin], 256-d, max period 1e4) then an MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # GLIDE/ADM form: freqs = exp(-ln(max_period) * i / half), embedding = [cos, sin].
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs.to(t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with an extra null class (index ``num_classes``) for classifier-free
    guidance; labels are dropped with probability ``dropout_prob`` in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(
        self,
        labels: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if force_drop_ids is not None:
            drop_ids = force_drop_ids == 1
        elif generator is None:
            # The release draws on the CPU generator, then moves the mask to the labels' device.
            drop_ids = (torch.rand(labels.shape[0]) < self.dropout_prob).to(labels.device)
        else:
            # Drawn where the generator lives (the labels' device in training): no host copy.
            draw = torch.rand(labels.shape[0], generator=generator, device=generator.device)
            drop_ids = (draw < self.dropout_prob).to(labels.device)
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self,
        labels: torch.Tensor,
        train: bool,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


def relative_position_index(grid: int) -> torch.Tensor:
    """BEiT/Swin relative position index over a ``grid x grid`` token grid (row-major tokens):
    ``(dr + grid - 1) * (2 grid - 1) + (dc + grid - 1)``, with dr, dc = query minus key."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    coords = coords.flatten(1)  # [2, L]: (row, col) of each token
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [L, L, 2]
    return (rel[..., 0] + grid - 1) * (2 * grid - 1) + (rel[..., 1] + grid - 1)


class RelativePositionBias(nn.Module):
    """A learned bias per (relative offset, head). The table keeps BEiT's 3 unused cls slots so
    its shape, ``[(2g-1)^2 + 3, heads]``, is the release's.

    Both bias layouts are ONE ``torch.gather`` from the ``[heads, R]`` view of the table: its
    backward is a scatter_add into a table-sized buffer. ``table[index]`` (the release) needs an
    ``index_put`` backward, and gathering rows then columns of an expanded ``[B, H, L, L]`` bias
    allocates ``[B, H, K, L]`` and ``[B, H, L, L]`` zero buffers in backward; at MDTv2-S/2 on
    this CPU the gather is 0.4 ms (full) and 1.8 ms (masked, B=8) against 16 and 77 ms.
    """

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        self.grid = grid
        self.num_relative_distance = (2 * grid - 1) ** 2 + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=True)

    def _table(self) -> torch.Tensor:
        """The table as ``[H, R]`` in fp32, whatever the parameter's dtype. The gather's backward
        sums every logit gradient of a table entry (hundreds to thousands per entry and step,
        nearly cancelling: softmax rows sum to zero); gathered from a bf16 table that sum would
        run in bf16 (on CUDA as bf16 atomics, in any order) and lose the small terms. Gathered
        from fp32 it is summed in fp32 and rounded once, into the parameter's own dtype."""
        return self.relative_position_bias_table.float().t()

    @staticmethod
    def _cast(bias: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return bias if dtype is None else bias.to(dtype)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full bias ``[heads, L, L]``, contiguous, gathered in fp32 and cast to ``dtype``
        (default: fp32)."""
        table = self._table()
        length = self.grid**2
        index = self.relative_position_index.view(1, -1).expand(table.shape[0], -1)
        return self._cast(torch.gather(table, 1, index).view(-1, length, length), dtype)

    def kept(self, ids_keep: torch.Tensor, dtype: torch.dtype | None = None, align: int = 1) -> torch.Tensor:
        """Per-sample bias ``[B, H, K, K]`` between the kept tokens' original positions,
        ``bias[h, keep[b, i], keep[b, j]]``, gathered in fp32 and cast to ``dtype``. ``align > 1`` pads the storage of each row to a
        multiple of ``align`` (the view is still ``K`` wide), so a kernel that wants aligned
        strides (CUDA mem-efficient SDPA: 8 elements) takes it without its own padded copy."""
        batch, kept = ids_keep.shape
        rel = self.relative_position_index[ids_keep[:, :, None], ids_keep[:, None, :]]  # [B, K, K]
        if align > 1:  # branch on the Python int only: K may be symbolic under torch.compile
            rel = F.pad(rel, (0, (-kept) % align))  # index 0 is a valid row; the view drops it
        padded = rel.shape[-1]
        table = self._table()
        heads = table.shape[0]
        index = rel.view(batch, 1, kept * padded).expand(-1, heads, -1)
        bias = self._cast(torch.gather(table.unsqueeze(0).expand(batch, -1, -1), 2, index), dtype)
        return bias.view(batch, heads, kept, padded)[..., :kept]


def gather_bias(bias: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Per-sample bias ``[B, H, K, K]`` for the kept tokens, ``bias[h, keep[b, i], keep[b, j]]``,
    from a full ``[H, L, L]`` bias by one advanced indexing (the model itself gathers from the
    table, see :meth:`RelativePositionBias.kept`)."""
    return bias[:, ids_keep[:, :, None], ids_keep[:, None, :]].transpose(0, 1)


ATTENTION_BACKENDS = ("sdpa", "flex", "explicit")
# Bias rows padded to a multiple of 8 elements: CUDA's memory-efficient SDPA kernel needs aligned
# mask strides and would otherwise copy the bias into a padded buffer itself, every block.
SDPA_ROW_ALIGN = 8
_compiled_flex: Callable[..., torch.Tensor] | None = None


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """``softmax(q k^T * scale + B) v`` written out, in the release's order (timm/BEiT)."""
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    return attn.softmax(dim=-1) @ v


def flex_attention_with_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    ids_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlexAttention (Dong et al., 2024) with a ``score_mod`` that adds ``bias[h, i, j]`` (the
    full ``[H, L, L]`` bias); in the masked pass it reads the bias through the kept indices, so
    no per-sample ``[B, H, K, K]`` bias is materialised. On CUDA it is compiled once (dynamic
    shapes) unless already inside a compiled region: uncompiled FlexAttention materialises the
    scores."""
    from torch.nn.attention.flex_attention import flex_attention

    if ids_keep is None:

        def score_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - FlexAttention's API
            return score + bias[h, q_idx, kv_idx]
    else:

        def score_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
            return score + bias[h, ids_keep[b, q_idx], ids_keep[b, kv_idx]]

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    if not q.is_cuda:
        # CPU FlexAttention is forward-only (no backward in torch 2.14): the unfused reference
        # serves eval and tests without a compile; compile_blocks still fuses it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(q, k, v, score_mod=score_mod, scale=scale)


class Attention(nn.Module):
    """Multi-head self-attention ``softmax(q k^T / sqrt(d) + B) v`` with a relative position
    bias B. ``backend``: "sdpa" (``scaled_dot_product_attention`` with B as an additive float
    mask), "flex" (FlexAttention, GPUs) or "explicit" (written out, as released). All three
    compute the same function with the same parameters."""

    def __init__(self, dim: int, num_heads: int, grid: int, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[0], qkv[1], qkv[2]: each select's backward zero-fills a buffer of the
        # whole [3, B, H, L, D] tensor and the three are summed; unbind's backward is one stack.
        return qkv.unbind(0)

    def bias(self, ids_keep: torch.Tensor | None, dtype: torch.dtype | None = None, align: int = 1) -> torch.Tensor:
        """``[1, H, L, L]`` (full pass) or ``[B, H, K, K]`` (kept tokens), in ``dtype``."""
        if ids_keep is None:
            return self.rel_pos_bias(dtype).unsqueeze(0)
        return self.rel_pos_bias.kept(ids_keep, dtype, align)

    def forward(
        self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``bias``: this layer's :meth:`bias` for ``ids_keep`` computed by the caller (compiled
        blocks gather it outside the graph); ``None`` gathers it here. Flex reads the table.
        The same branch runs on every device: "sdpa" is SDPA on a CPU too (in training that is
        its math path), with the same 8-aligned bias rows that CUDA's kernels want."""
        batch, tokens, dim = x.shape
        q, k, v = self.qkv_heads(x)
        if self.backend == "flex":
            self._check_flex(q)
            # FlexAttention computes its scores in fp32 whatever q's dtype: the bias stays fp32.
            out = flex_attention_with_bias(q, k, v, self.rel_pos_bias(torch.float32), self.scale, ids_keep)
            return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        if bias is None:
            align = SDPA_ROW_ALIGN if self.backend == "sdpa" else 1
            bias = self.bias(ids_keep, q.dtype, align)
        else:
            # Under autocast q is bf16/fp16 while the given bias is fp32: SDPA needs the mask in q.dtype.
            bias = bias.to(q.dtype)
        if self.backend == "explicit":
            out = explicit_attention(q, k, v, bias, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def _check_flex(self, q: torch.Tensor) -> None:
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError(
                f"attention='flex' cannot train on CPU: FlexAttention has no backward on CPU in torch "
                f"{torch.__version__}. Use model.attention='sdpa' (or 'explicit') on CPU; 'flex' runs "
                "forward-only here (eval, torch.no_grad) and trains on CUDA."
            )


_GELU_2C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel, 2016), as the release's
    ``nn.GELU(approximate="tanh")``. Under ``torch.compile`` it is written as
    ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))``, the same function (``(1 + tanh z) / 2 =
    sigmoid(2z)``): inductor's vectorised CPU tanh costs about 5x its exp, and the fused sigmoid
    form ran forward + backward in 2.7 ms against 7.5 ms for aten's kernel on a [2048, 1536]
    fp32 tensor here (max difference 5e-7). Eager keeps aten's single kernel: written out, the
    sigmoid form would be six passes over memory."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(_GELU_2C * x * (1 + 0.044715 * x * x))
    return F.gelu(x, approximate="tanh")


class GeluTanh(nn.Module):
    """:func:`gelu_tanh` as a module (no parameters: the state_dict is the release's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, key names as timm's Mlp."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = GeluTanh()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MDTBlock(nn.Module):
    """DiT block with adaLN-Zero, a relative position bias, and (for skip blocks) a
    ``skip_linear(cat([x, skip]))`` at its input: the long skips of en_outblocks and the dense
    input shortcut of de_blocks. Skip and kept indices are explicit arguments so that an
    activation-checkpointing wrapper applied from outside can pass them through."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        grid: int,
        skip: bool = False,
        attention: str = "sdpa",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, grid, attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        skip: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("a skip block needs its skip tensor")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep, attn_bias)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm, adaLN (shift, scale), then a linear to ``p * p * out_channels`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2-D sin-cos embedding ``[grid*grid, D]``: the first half of the channels encodes the
    column coordinate, the second half the row; each half is ``[sin, cos]`` of
    ``pos / 10000 ** (2i / (D/2))`` (computed in float64 as MAE's numpy code does)."""
    if embed_dim % 4:
        raise ValueError(f"hidden_size {embed_dim} must be divisible by 4 for the 2-D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode_1d(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([encode_1d(cols), encode_1d(rows)], dim=1).float()
