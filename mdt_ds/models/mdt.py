"""MDTv2: the Masked Diffusion Transformer v2, as released (sail-sg/MDT 7d26c21).

Asymmetric masking architecture (Gao et al., "MDTv2", 2023):

    tokens -> [mask] -> en_inblocks -> en_outblocks (long skips, LIFO) ->
    [side-interpolator + masked shortcut] -> de_blocks (dense input shortcut) -> final layer

The state_dict keys and shapes are exactly the release's, so official checkpoints such as
``mdt_xl2_v2_ckpt.pt`` load with ``strict=True``. This file is pure torch: no deepspeed, no
torch.distributed, no data or logging code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mdt_ds.models.guidance import guide_eps
from mdt_ds.models.layers import (
    FinalLayer,
    LabelEmbedder,
    MDTBlock,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
)


@dataclass
class Masking:
    """The random masking of one forward pass (MAE-style, per sample)."""

    ids_keep: torch.Tensor  # [N, K] indices of the tokens the encoder sees
    ids_restore: torch.Tensor  # [N, L] inverse of the shuffle
    mask: torch.Tensor  # [N, L] 1 on masked positions, 0 on kept ones


def random_masking(noise: torch.Tensor, ratio: float | torch.Tensor) -> Masking:
    """MAE masking from per-token noise: the ``int(L * (1 - ratio))`` tokens with the lowest
    noise are kept (He et al., 2022; the release's ``random_masking``). A Python float ratio
    costs no host sync; a tensor ratio is read back once (``int()``), as the release does."""
    length = noise.shape[1]
    len_keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # The release gathers [0]*K + [1]*(L-K) through ids_restore: 1 exactly where rank >= K.
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return Masking(ids_shuffle[:, :len_keep], ids_restore, mask)


class MDTv2(nn.Module):
    """MDTv2 with the release's constructor keywords.

    ``mask_ratio`` is the lower end of the training mask ratio (drawn uniformly in
    ``[mask_ratio, mask_ratio + 0.2)`` per forward); ``None`` builds a model that cannot run the
    masked pass (its ``mask_token`` still exists, frozen, so key sets match).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mask_ratio: float | None = None,
        decode_layer: int = 4,
        attention: str = "sdpa",
    ):
        super().__init__()
        if not 0 <= decode_layer <= depth:
            raise ValueError(f"decode_layer {decode_layer} must lie in [0, depth={depth}]")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.decode_layer = int(decode_layer)
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)
        self.attention = attention  # every Attention module's backend; no parameter depends on it

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = self.x_embedder.grid_size
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))
        # The release freezes mask_token when built without a mask ratio; keys stay the same.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=mask_ratio is not None)

        # As released: an odd (depth - decode_layer) silently drops one encoder block.
        half = (depth - self.decode_layer) // 2
        block = dict(hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, grid=grid, attention=attention)
        self.en_inblocks = nn.ModuleList(MDTBlock(**block) for _ in range(half))
        self.en_outblocks = nn.ModuleList(MDTBlock(**block, skip=True) for _ in range(half))
        self.de_blocks = nn.ModuleList(MDTBlock(**block, skip=True) for _ in range(self.decode_layer))
        self.sideblocks = nn.ModuleList([MDTBlock(**block)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """The release's init: Xavier Linear, zero biases, MAE sin-cos position embeddings,
        N(0, .02) embedders and mask token, adaLN-Zero (modulation and final layer zeroed)."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        if self.pos_embed.is_meta:
            return
        sincos = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size).unsqueeze(0)
        with torch.no_grad():
            self.pos_embed.copy_(sincos)
            self.decoder_pos_embed.copy_(sincos)
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for block in self.blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def blocks(self) -> list[MDTBlock]:
        """Every transformer block, in execution order of the masked pass."""
        return [*self.en_inblocks, *self.en_outblocks, *self.sideblocks, *self.de_blocks]

    # --------------------------------------------------------------- masking
    def draw_masking(
        self,
        batch: int,
        device: torch.device,
        mask_noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Masking:
        """Draw the masking as the release does (ratio first, then per-token noise), or take
        the given ratio / token noise so tests and users can drive it deterministically. With a
        Python float ``mask_ratio`` and a generator on ``device`` nothing is read back to the
        host; a drawn ratio (``mask_ratio=None``) comes from the CPU generator (or the given
        CPU generator), uniform in ``[mask_ratio, mask_ratio + 0.2)`` as released."""
        if mask_ratio is None:
            if self.mask_ratio is None:
                raise ValueError("this model was built with mask_ratio=None: pass mask_ratio= or rebuild it")
            # K = int(L * (1 - ratio)) sets shapes, so the host needs the ratio: draw it there
            # (the release draws a device tensor and syncs on int()). A device generator can
            # only be read back, at the cost of one sync: pass a float mask_ratio instead.
            gen_device = "cpu" if generator is None else generator.device
            mask_ratio = torch.rand(1, generator=generator, device=gen_device).item() * 0.2 + self.mask_ratio
        if mask_noise is None:
            length = self.x_embedder.num_patches
            gen_device = device if generator is None else generator.device
            mask_noise = torch.rand(batch, length, generator=generator, device=gen_device).to(device)
        return random_masking(mask_noise, mask_ratio)

    def side_interpolate(self, x: torch.Tensor, c: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Side-interpolator: fill the masked positions with mask tokens, unshuffle, add the
        decoder position embedding, run the side block over all tokens, then the masked
        shortcut ``x * M + (1 - M) * x_before`` (M = 1 on masked positions)."""
        length = masking.ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(x.shape[0], length - x.shape[1], -1)
        x = torch.cat([x, mask_tokens], dim=1)
        index = masking.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
        x = torch.gather(x, 1, index) + self.decoder_pos_embed
        x_before = x
        for block in self.sideblocks:
            x = block(x, c, None, None)
        mask = masking.mask.unsqueeze(-1).to(x.dtype)
        return x * mask + (1 - mask) * x_before

    # --------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        enable_mask: bool = False,
        mask_noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full pass (``enable_mask=False``) or masked training pass. ``generator`` drives
        every random draw of the pass (mask ratio, token noise, label dropout) on its device;
        without it they come from the global generators, as in the release.

        x: [N, C, H, W] noisy latents; t: [N] timesteps; y: [N] labels (``num_classes`` = null).
        Returns [N, out_channels, H, W]: eps then (with learn_sigma) the variance values.
        """
        x = self.x_embedder(x) + self.pos_embed
        input_skip = x  # dense input shortcut: the full, unmasked tokens
        masking = None
        if enable_mask:
            masking = self.draw_masking(x.shape[0], x.device, mask_noise, mask_ratio, generator)
            index = masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2])
            x = torch.gather(x, 1, index)
        # With a generator the label dropout is drawn from it too, after the masking.
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids, generator)
        ids_keep = None if masking is None else masking.ids_keep

        skips = []
        for block in self.en_inblocks:
            x = block(x, c, None, ids_keep)
            skips.append(x)
        for block in self.en_outblocks:
            x = block(x, c, skips.pop(), ids_keep)

        if masking is not None:
            x = self.side_interpolate(x, c, masking)
        else:
            x = x + self.decoder_pos_embed
        for block in self.de_blocks:
            x = block(x, c, input_skip, None)
        return self.unpatchify(self.final_layer(x, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C] (c fastest) -> [N, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h = w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float | None = None,
        diffusion_steps: int = 1000,
        scale_pow: float = 4.0,
        guide_channels: str = "release",
    ) -> torch.Tensor:
        """Classifier-free guidance with the release's contract: the batch comes doubled
        (``x = [z; z]``, ``y = [labels; null]``, ``t = [t; t]``), ONE forward runs over it, and
        the guided eps is returned for both halves. ``cfg_scale=None`` is a plain forward.
        ``guide_channels``: "release" guides eps channels ``[:min(3, C)]``, "all" all of them;
        the variance channels are never guided."""
        if cfg_scale is None:
            return self.forward(x, t, y)
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        return guide_eps(
            out, t, cfg_scale, self.in_channels, diffusion_steps, scale_pow, guide_channels
        )
