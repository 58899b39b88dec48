"""The DINOv2 Vision Transformer with the official Python API and state-dict layout.

Keys and shapes match the released checkpoints (``dinov2_vits14_pretrain.pth`` ...): ``cls_token``
[1,1,D], ``pos_embed`` [1,1+M*M,D], ``register_tokens`` [1,R,D], ``mask_token`` [1,D],
``patch_embed.proj``, ``blocks.{i}.*``, ``norm``. Token order inside the model: class token,
register tokens, patch tokens (row-major). Registers get no position embedding.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from dinolab.layers.block import Block
from dinolab.layers.patch_embed import PatchEmbed


class DinoVisionTransformer(nn.Module):
    """ViT backbone (paper §4, official ``DinoVisionTransformer`` with ``block_chunks=0``).

    Args:
        img_size: size the learned position embeddings are stored for (518 -> 37x37 grid for p14);
            any input whose sides are multiples of ``patch_size`` works through interpolation.
        interpolate_offset: the official ``scale_factor=(n + offset) / M`` kludge; 0.1 for the
            released plain checkpoints, 0.0 (use an exact output size) for the register ones.
        interpolate_antialias: antialiased bicubic (True for released register checkpoints).
        drop_path_rate: stochastic depth rate, uniform over blocks (``drop_path_uniform``) or
            linearly increasing when ``drop_path_uniform=False``.
        fused_attn: SDPA (True), explicit softmax (False), or None to pick per call (see
            ``dinolab.layers.attention``).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        init_values: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        drop_path_mode: str = "efficient",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        fused_attn: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        kw = dict(device=device, dtype=dtype)
        # constructor arguments, stored with exported weights so they rebuild this exact model
        self.arch_kwargs = {k: v for k, v in locals().items() if k not in ("self", "kw", "device", "dtype", "__class__")}
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.init_values = init_values
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, **kw)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + grid * grid, embed_dim, **kw))
        self.register_tokens = (
            nn.Parameter(torch.empty(1, num_register_tokens, embed_dim, **kw)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, **kw))
        rates = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, ffn_layer, init_values,
                rates[i], drop_path_mode, fused_attn, **kw,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **kw)
        self.head = nn.Identity()
        # recompute each block's activations in the backward instead of keeping them (training memory)
        self.activation_checkpointing = False
        self.init_weights()

    # ---------------------------------------------------------------- init
    def init_weights(self) -> None:
        """Official init: pos_embed trunc_normal(0.02), cls/registers normal(1e-6), Linear
        trunc_normal(0.02) with zero bias, mask_token zeros, LayerScale to ``init_values``."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif hasattr(m, "gamma"):
                m.init_weights()

    def set_fused_attn(self, enabled: bool | None) -> None:
        for blk in self.blocks:
            blk.attn.fused_attn = enabled

    def set_varlen_attention(self, enabled: bool) -> None:
        """Packed groups attend in one variable-length call (see ``dinolab.layers.attention``)."""
        for blk in self.blocks:
            blk.attn.varlen = enabled

    # ---------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Position embeddings [1, 1 + (w/p)*(h/p), D] in ``x``'s dtype, for tokens x [B, 1 + N, D] (class token
        + patches, before registers) of an image batch [B, 3, w, h].

        The official signature and argument order: as in dinov2, ``w`` is the image's dim 2 (its height in
        pixels) and ``h`` its dim 3. Bicubic resampling of the stored M x M grid, exactly as the official
        code: with ``interpolate_offset`` > 0 the output size comes from ``scale_factor=(n + offset)/M``
        (released plain weights: 0.1), otherwise from the exact size ``(w/p, h/p)``.
        """
        n_tokens, dtype = x.shape[1], x.dtype
        h, w = w, h  # below: h = rows (dim 2), w = columns (dim 3)
        N = self.pos_embed.shape[1] - 1
        if n_tokens - 1 == N and h == w:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        dim = pos.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        M = int(math.sqrt(N))
        kwargs: dict = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = ((h0 + self.interpolate_offset) / M, (w0 + self.interpolate_offset) / M)
        else:
            kwargs["size"] = (h0, w0)
        grid = F.interpolate(
            pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        if grid.shape[-2:] != (h0, w0):  # the scale-factor path can round one step short (PR #378)
            raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
        return torch.cat((pos[:, :1], grid), dim=1).to(self.pos_embed.dtype).to(dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 3, H, W], masks [B, N] bool -> tokens [B, 1 + R + N, D].

        Masked patch embeddings are replaced by ``mask_token`` *before* the position embedding.
        """
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, 3, H, W], got shape {tuple(x.shape)}")
        _, _, H, W = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must have shape {tuple(x.shape[:2])} (batch, patches), got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat((x[:, :1], regs, x[:, 1:]), dim=1)
        return x

    # ---------------------------------------------------------------- forward
    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(self, xs: list[torch.Tensor], masks_list: list) -> list[dict]:
        """Several image groups (e.g. global and local crops) through one packed pass per block."""
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list)]
        for blk in self.blocks:
            tokens = self._run_block(blk, tokens)
        return [self._output_dict(t, m) for t, m in zip(tokens, masks_list)]

    def forward_features(self, x, masks: torch.Tensor | None = None):
        """x [B, 3, H, W] -> dict of ``x_norm_clstoken`` [B, D], ``x_norm_regtokens`` [B, R, D],
        ``x_norm_patchtokens`` [B, N, D], ``x_prenorm`` [B, 1+R+N, D], ``masks``.

        A list of image tensors (with a list of masks or None) gives a list of such dicts,
        computed in one packed pass per block.
        """
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(list(x), list(masks) if masks is not None else [None] * len(x))
        t = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            t = self._run_block(blk, t)
        return self._output_dict(t, masks)

    def _run_block(self, blk: nn.Module, tokens):
        """``blk(tokens)``; under ``activation_checkpointing`` (and autograd) its activations are recomputed
        in the backward, with the same random drop-path subsets (the RNG state is replayed)."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, tokens, use_reentrant=False)
        return blk(tokens)

    def forward(self, *args, is_training: bool = False, **kwargs):
        """The official entry point: the normalised class token [B, D], or the full dict when training."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    def _get_intermediate_layers(self, x: torch.Tensor, n: int | list[int]) -> list[torch.Tensor]:
        x = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        take = set(range(total - n, total)) if isinstance(n, int) else set(n)
        if any(i < 0 or i >= total for i in take):
            raise ValueError(f"block indices {sorted(take)} out of range for a model of {total} blocks")
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                outputs.append(x)
            if len(outputs) == len(take):
                break  # later blocks are not needed
        return outputs

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Outputs of the last ``n`` blocks (int) or of the listed block indices, in block order.

        Returns a tuple of patch tokens [B, N, D] (``reshape=True``: [B, D, H/p, W/p]); with
        ``return_class_token`` a tuple of (patch_tokens, class_token [B, D]) pairs. ``norm`` applies
        the final LayerNorm to each output, as the official code does.
        """
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            B, _, H, W = x.shape
            p = self.patch_size
            outputs = [o.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block [B, heads, T, T], T = 1 + R + N (explicit path)."""
        t = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(t))
