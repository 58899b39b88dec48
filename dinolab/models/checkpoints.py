"""Reading and writing backbone weights: one place that knows every layout users bring.

Accepted inputs (never unpickling code: ``torch.load(weights_only=True)`` or safetensors):

- official released backbones (``dinov2_vits14_pretrain.pth``): keys ``blocks.{i}.*``;
- official training checkpoints: a ``{"model": ...}`` or ``{"teacher": ...}`` dict, keys prefixed
  ``teacher.backbone.`` / ``student.backbone.`` (the teacher is preferred), chunked blocks
  ``blocks.{chunk}.{i}.*`` (the inner index is already the global block index);
- dinolab training checkpoints and exports (same keys as the official backbone);
- Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dicts (converted, see ``hf.py``).

Shapes are checked before loading so that weights of another architecture give one clear line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

_CONTAINER_KEYS = ("teacher", "model", "state_dict", "student")
_PREFIXES = ("teacher.backbone.", "student.backbone.", "model.", "module.", "backbone.", "_orig_mod.", "dinov2.")
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or ``.pth``/``.pt`` file (safe loading only).

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return obj


def read_arch_kwargs(path: str | Path) -> dict | None:
    """Constructor kwargs stored in a dinolab ``.safetensors`` export (None for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["dinolab_arch"]) if "dinolab_arch" in meta else None


def _unwrap(sd: dict) -> dict[str, torch.Tensor]:
    """Descend into ``{"teacher": {...}}``-style containers until we reach tensors."""
    while not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _CONTAINER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"no tensors found in the checkpoint (top-level keys: {sorted(sd)[:8]})")
        sd = inner
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def to_backbone_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    """Any supported checkpoint dict -> official backbone keys (``blocks.{i}.*`` ...)."""
    from dinolab.models import hf

    sd = _unwrap(sd)
    if any(k.startswith("teacher.backbone.") for k in sd):  # a whole meta-arch: keep the teacher
        sd = {k: v for k, v in sd.items() if k.startswith("teacher.backbone.")}
    elif any(k.startswith("student.backbone.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("student.backbone.")}
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            k = k.removeprefix(p)
        out[_CHUNKED.sub(r"blocks.\2.", k)] = v
    if hf.is_hf_state_dict(out):
        out = hf.hf_to_official(out)
    return out


def describe(sd: dict[str, torch.Tensor]) -> str:
    """A short architecture description of backbone weights, for error messages."""
    d = sd["cls_token"].shape[-1] if "cls_token" in sd else "?"
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    p = sd["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in sd else "?"
    return f"embed_dim {d}, {depth} blocks, patch {p}, {regs} registers"


def resample_pos_embed(pos_embed: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[1, 1+M*M, D] -> [1, 1+n_patches, D] by bicubic resampling of the square grid."""
    M, m = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(n_patches)
    grid = pos_embed[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(m, m), mode="bicubic", antialias=m < M)
    grid = grid.permute(0, 2, 3, 1).reshape(1, m * m, -1).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :1], grid), dim=1)


def load_backbone_weights(model: torch.nn.Module, source, strict: bool = True, name: str | None = None) -> None:
    """Load a file path or state dict (any supported layout) into ``model``.

    A position embedding stored for another grid is resampled to the model's grid.

    Raises:
        ValueError: the weights are for another architecture (the message says which).
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "state dict")
    raw = read_state_dict(source) if isinstance(source, (str, Path)) else source
    sd = to_backbone_state_dict(raw)
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        if sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], own["pos_embed"].shape[1] - 1)
    mismatched = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if mismatched or (strict and (missing or unexpected)):
        detail = (
            f"shape of {mismatched[0]}: {tuple(sd[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}"
            if mismatched
            else f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        )
        raise ValueError(
            f"weights {name} ({describe(sd)}) do not fit the model ({describe(own)}): {detail}"
        )
    model.load_state_dict(sd, strict=strict)


def save_backbone(model_or_sd, path: str | Path) -> None:
    """Write backbone weights with official keys: ``.safetensors`` or an official-format ``.pth``.

    A model's ``.safetensors`` also stores its constructor arguments in the metadata header, so
    ``build_backbone("auto", weights=...)`` rebuilds it exactly (head count included).
    """
    from dinolab.utils.io import atomic_path, atomic_torch_save

    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    arch = getattr(model_or_sd, "arch_kwargs", None)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"dinolab_arch": json.dumps(arch)} if arch else None
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata=meta)
    else:
        atomic_torch_save(sd, path)


def infer_arch_kwargs(sd: dict[str, torch.Tensor]) -> dict:
    """Constructor kwargs read off official-layout backbone weights (heads: 64 dims each)."""
    sd = to_backbone_state_dict(sd)
    dim = sd["cls_token"].shape[-1]
    n_pos = sd["pos_embed"].shape[1] - 1
    patch = sd["patch_embed.proj.weight"].shape[-1]
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    return dict(
        embed_dim=dim,
        depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        num_heads=max(1, dim // 64),
        patch_size=patch,
        img_size=math.isqrt(n_pos) * patch,
        ffn_layer="swiglufused" if swiglu else "mlp",
        mlp_ratio=4.0 if swiglu else hidden / dim,
        num_register_tokens=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
    )
