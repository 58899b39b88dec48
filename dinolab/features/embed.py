"""The one image -> features core: a backbone and images in, class / patch / register tokens of chosen blocks out.

Every consumer goes through here: ``dinolab extract`` and :func:`dinolab.embed`
(:mod:`dinolab.features.files`), the evaluation protocols (:mod:`dinolab.features.cache`), the k-NN
monitor of training, curation (:mod:`dinolab.curate.embed`) and the viz tools. Shapes, with B images,
L listed blocks, D the width, (h, w) the patch grid, N = h * w patches and R register tokens:

=============  ==================  ==================================================================
key            shape               what
=============  ==================  ==================================================================
``cls``        [B, L, D] fp32      class token of each listed block
``patch``      [B, L, h, w, D]     patch tokens of each listed block (``spec.patch == "all"``), fp32
``patch_mean`` [B, D] fp32         mean patch token of the last listed block (``"mean"``, the linear
                                   probe's ``avgpool``)
``registers``  [B, R, D] fp32      register tokens of the last block (``spec.registers``)
=============  ==================  ==================================================================

A module without ``get_intermediate_layers`` is taken as ``x [B, 3, H, W] -> [B, D]``: its output is
the class token (``cls`` [B, 1, D]; curation accepts any such embedder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dinolab.features.inputs import ModelInputs, Preprocess
from dinolab.utils.runtime import compile_blocks


@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens to keep.

    Attributes:
        layers: the last ``n`` blocks (int) or block indices (tuple), as ``get_intermediate_layers``.
        norm: apply the final LayerNorm to every output (official classification / segmentation:
            True; official depth heads: False).
        patch: "none", "mean" (the average of the patch tokens of the last listed block, the
            linear probe's ``avgpool``) or "all" (patch tokens of every listed block).
        registers: also the register tokens (last block, normalised: ``forward_features``'s
            ``x_norm_regtokens``; ``get_intermediate_layers`` drops them), so only with ``layers=1, norm=True``.
    """

    layers: int | tuple[int, ...] = 1
    norm: bool = True
    patch: str = "none"
    registers: bool = False

    def __post_init__(self) -> None:
        if self.patch not in ("none", "mean", "all"):
            raise ValueError(f"FeatureSpec.patch must be 'none', 'mean' or 'all', got {self.patch!r}")
        if self.registers and (self.layers != 1 or not self.norm):
            raise ValueError("FeatureSpec.registers needs layers=1 and norm=True (the last block's normalised tokens)")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a parameterless module)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.inference_mode()
def embed_batch(model: nn.Module, x: torch.Tensor, spec: FeatureSpec = FeatureSpec(), bf16: bool = False
                ) -> dict[str, torch.Tensor]:
    """Tokens of one batch ``x`` [B, 3, H, W] (moved to the model's device); CPU tensors, see the module table."""
    device = model_device(model)
    x = x.to(device)
    # enabled=False also switches off a caller's autocast: fp32 means fp32 (training calls the monitor)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if not hasattr(model, "get_intermediate_layers"):
            return {"cls": model(x).float().cpu()[:, None]}
        if spec.registers:
            return _last_block_tokens(model, x, spec)
        layers = list(spec.layers) if isinstance(spec.layers, tuple) else spec.layers
        grid = spec.patch != "none"  # [B, D, h, w] patch tokens (no copy when only class tokens are asked for)
        outs = model.get_intermediate_layers(x, n=layers, reshape=grid, return_class_token=True, norm=spec.norm)
    out = {"cls": torch.stack([c.float() for _, c in outs], 1).cpu()}
    if spec.patch == "mean":
        out["patch_mean"] = outs[-1][0].float().mean(dim=(2, 3)).cpu()  # over the [B, D, h, w] grid
    elif spec.patch == "all":
        out["patch"] = torch.stack([p.permute(0, 2, 3, 1).float() for p, _ in outs], 1).cpu()
    return out


def _last_block_tokens(model: nn.Module, x: torch.Tensor, spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """One ``forward_features`` pass: the last block's class, register and patch tokens (normalised)."""
    ff = model.forward_features(x)
    out = {"cls": ff["x_norm_clstoken"].float()[:, None].cpu(), "registers": ff["x_norm_regtokens"].float().cpu()}
    patches = ff["x_norm_patchtokens"].float()
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    if spec.patch == "mean":
        out["patch_mean"] = patches.mean(dim=1).cpu()
    elif spec.patch == "all":
        out["patch"] = patches.reshape(len(x), 1, h, w, -1).cpu()
    return out


@dataclass
class EmbedOptions:
    """How a sequence of images is run.

    ``batch_size`` images per pass; ``bf16`` autocast; ``compile`` the blocks first (~20 s once, then 1.15x for
    ViT-S/14 fp32 on a 2-core CPU: worth it for large sets); ``num_workers`` decoding processes; a tqdm bar
    (``progress``, ``desc``); ``patch_dtype`` of the stored patch tokens (float16 halves the RAM of dense
    features; cast batch by batch).
    """

    batch_size: int = 64
    bf16: bool = False
    compile: bool = False
    num_workers: int = 0
    progress: bool = True
    desc: str = "features"
    patch_dtype: torch.dtype = torch.float32


@dataclass
class Embedded:
    """Tokens of the readable images (see the module table, B = ``len(kept)``), ``kept`` and ``skipped``
    positions in the input sequence (skipped: unreadable files), each ascending."""

    tokens: dict[str, torch.Tensor]
    kept: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def embed(model: nn.Module, images: Sequence, pre: Preprocess, spec: FeatureSpec = FeatureSpec(),
          options: EmbedOptions = EmbedOptions()) -> Embedded:
    """Tokens of every image of ``images`` (paths, PIL images or uint8 arrays; see :class:`ModelInputs`).

    ``model`` is switched to eval mode. Unreadable files are skipped and reported in ``skipped``
    (``tokens`` is empty when nothing was readable). The global RNG is left as it was.
    """
    model.eval()
    if options.compile:
        compile_blocks([model], dynamic=None)  # shapes as torch.compile's default (dinolab extract --compile)
    # A local generator: the loader's base seed would otherwise be drawn from (and advance) the global RNG.
    loader = DataLoader(ModelInputs(images, pre), batch_size=options.batch_size, num_workers=options.num_workers,
                        generator=torch.Generator())
    parts: dict[str, list[torch.Tensor]] = {}
    kept, skipped = [], []
    with tqdm(total=len(images), desc=options.desc, unit="img", disable=not options.progress, leave=False) as bar:
        for x, idx, ok in loader:
            skipped += idx[~ok].tolist()
            if ok.any():
                tokens = embed_batch(model, x if ok.all() else x[ok], spec, options.bf16)
                for key, value in tokens.items():
                    parts.setdefault(key, []).append(value.to(options.patch_dtype) if key == "patch" else value)
                kept += idx[ok].tolist()
            bar.update(len(idx))
    return Embedded({k: torch.cat(v) for k, v in parts.items()}, kept, skipped)
