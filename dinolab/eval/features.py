"""Frozen features for the evaluation protocols, extracted once and cached on disk.

:func:`extract` runs a backbone over an :class:`~dinolab.eval.data.ImageSet` and returns class
tokens (and optionally patch tokens) of chosen blocks. The result is stored under
``cache_dir/<key>.pt`` where ``key`` hashes the model (architecture and every weight), the image
content, the preprocessing and the requested tokens, so a second protocol on the same model and
data (k-NN then linear, linear then logistic regression ...) reads the file instead of running
the backbone. Files are written atomically; a stale or foreign file can never be picked up
because any change of weights, data or preprocessing changes the key.

Input sizes. The backbone needs sides that are multiples of its patch size p. Defaults, chosen so
the whole ``bench/eval_table.py`` table runs in minutes on a 2-core CPU (override with
``image_size``):

* classification and retrieval (:func:`classification_preprocess`): images whose shorter side
  is >= 224 get the official transform (resize the shorter side to 256, centre crop 224);
  smaller images are resized (shorter side, bicubic) and centre-cropped to a square of side
  ``clamp(round_up(short_side, p), 8p, 16p)``, i.e. a grid of 8 to 16 patches per side: with
  p = 14, CIFAR 32x32 -> 112 and Imagenette 96x96 -> 112 (8x8 patches). Upsampling small images
  is what the DINOv2 transfer evaluations do (they use 224); 112 keeps the cost 4-5x lower. A
  patch-4 model trained on 32x32 crops gets 32 (CIFAR) and 64 (Imagenette).
* dense tasks (:func:`dense_preprocess`): the whole image is resized (no crop, so labels stay
  aligned) so that its shorter side is ``short_side`` (default 12p = 168 for p = 14), each side
  rounded to a multiple of p: CamVid 120x160 -> 168x224 (12x16 patches), NYU 240x320 ->
  168x224, KITTI 187x621 -> 168x560.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from dinolab.data.augment import sample_crop_box
from dinolab.data.transforms import normalize, to_tensor
from dinolab.eval.data import ImageSet
from dinolab.io import atomic_torch_save

CACHE_FORMAT_VERSION = 1  # bump when the stored layout changes


# ---------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input [3, H, W] (ImageNet mean/std normalised).

    Attributes:
        size: (H, W) of the model input; multiples of the patch size.
        crop_fraction: None resizes the whole image to ``size`` (dense tasks: labels stay aligned).
            A float resizes so that the shorter side is ``min(size) / crop_fraction`` and crops
            the centre (official classification eval: 224 / 256 = 0.875; 1.0 = no margin).
        hflip: mirror the input (multi-scale / flip test-time augmentation).
        augment: random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip with
            probability 0.5, the official linear-probe training transform; drawn from a generator
            seeded by ``(seed, image index)``, so a view is reproducible and cacheable.
        seed: see ``augment``.
    """

    size: tuple[int, int]
    crop_fraction: float | None = None
    hflip: bool = False
    augment: bool = False
    seed: int = 0

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def __call__(self, image: np.ndarray, index: int = 0) -> torch.Tensor:
        """uint8 [h, w, 3] -> float [3, H, W]."""
        pil = Image.fromarray(image)
        height, width = self.size
        if self.augment:
            rng = np.random.default_rng([self.seed, index])
            top, left, h, w = sample_crop_box(pil.width, pil.height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            pil = pil.resize((width, height), Image.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        elif self.crop_fraction is None:
            pil = pil.resize((width, height), Image.BICUBIC) if pil.size != (width, height) else pil
        else:
            pil = _resize_centre_crop(pil, height, width, self.crop_fraction)
        if self.hflip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(pil))


def _resize_centre_crop(pil: Image.Image, height: int, width: int, crop_fraction: float) -> Image.Image:
    scale = max(height / pil.height, width / pil.width) / crop_fraction
    new_w, new_h = max(width, round(pil.width * scale)), max(height, round(pil.height * scale))
    if (new_w, new_h) != pil.size:
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    return pil.crop((left, top, left + width, top + height))


def round_to_patch(value: float, patch_size: int) -> int:
    """Nearest positive multiple of ``patch_size``."""
    return max(patch_size, int(round(value / patch_size)) * patch_size)


def check_input_size(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Raise a ValueError unless both sides are positive multiples of ``patch_size``."""
    size = (int(size[0]), int(size[1]))
    if min(size) <= 0 or size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"input size {size[0]}x{size[1]} must be multiples of the patch size {patch_size}")
    return size


def classification_preprocess(native_hw: tuple[int, int], patch_size: int, image_size: int | None = None) -> Preprocess:
    """Default square input for classification / retrieval (see module docstring)."""
    short = min(native_hw)
    if image_size is None and short >= 224:
        return Preprocess(check_input_size((224, 224), patch_size), crop_fraction=0.875)
    if image_size is None:
        image_size = min(16 * patch_size, max(8 * patch_size, math.ceil(short / patch_size) * patch_size))
    return Preprocess(check_input_size((image_size, image_size), patch_size), crop_fraction=1.0)


def dense_preprocess(
    native_hw: tuple[int, int],
    patch_size: int,
    image_size: tuple[int, int] | None = None,
    short_side: int | None = None,
    scale: float = 1.0,
) -> Preprocess:
    """Whole-image resize for dense tasks; ``scale`` multiplies the size (multi-scale testing).

    ``image_size`` (H, W) must be multiples of the patch size; without it the shorter side becomes
    ``short_side`` (default 12 patches) and the longer one keeps the aspect ratio, both rounded to
    the patch size.
    """
    if image_size is not None:
        base = check_input_size(tuple(image_size), patch_size)
    else:
        factor = (short_side or 12 * patch_size) / min(native_hw)
        base = (native_hw[0] * factor, native_hw[1] * factor)
    return Preprocess((round_to_patch(base[0] * scale, patch_size), round_to_patch(base[1] * scale, patch_size)))


# ---------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens to keep.

    Attributes:
        layers: the last ``n`` blocks (int) or block indices (tuple), as ``get_intermediate_layers``.
        norm: apply the final LayerNorm to every output (official classification / segmentation:
            True; official depth heads: False).
        patch: "none", "mean" (the average of the patch tokens of the last listed block, the
            linear probe's ``avgpool``) or "all" (patch tokens of every listed block).
    """

    layers: int | tuple[int, ...] = 1
    norm: bool = True
    patch: str = "none"

    def __post_init__(self) -> None:
        if self.patch not in ("none", "mean", "all"):
            raise ValueError(f"FeatureSpec.patch must be 'none', 'mean' or 'all', got {self.patch!r}")


@dataclass
class FeatureConfig:
    """Extraction settings shared by every protocol.

    Attributes:
        batch_size: images per forward pass.
        bf16: bfloat16 autocast (CPU with AVX512-BF16 / AMX and GPUs: several times faster).
        cache_dir: where features are cached; None: ``$DINOLAB_CACHE/eval-features`` or
            ``~/.cache/dinolab/eval-features``.
        use_cache: False recomputes and does not write.
        progress: show a tqdm bar per extraction.
    """

    batch_size: int = 64
    bf16: bool = True
    cache_dir: str | None = None
    use_cache: bool = True
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_cache_dir() -> Path:
    base = os.environ.get("DINOLAB_CACHE")
    return Path(base) / "eval-features" if base else Path.home() / ".cache" / "dinolab" / "eval-features"


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture (module repr + attributes) and every parameter and buffer value.

    Memoised per model object while no tensor is modified in place (``Tensor._version``), so
    several protocols on one model hash its weights once.
    """
    state = model.state_dict()
    token = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == token:
        return cached[1]
    h = hashlib.sha256(repr(model).encode())
    attrs = ("patch_size", "num_register_tokens", "interpolate_offset", "interpolate_antialias", "n_blocks")
    h.update(repr([getattr(model, a, None) for a in attrs]).encode())
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    digest = h.hexdigest()[:32]
    _FINGERPRINTS[model] = (token, digest)
    return digest


def cache_key(model: nn.Module, images: ImageSet, pre: Preprocess, spec: FeatureSpec, bf16: bool) -> str:
    parts = {
        "version": CACHE_FORMAT_VERSION,
        "model": model_fingerprint(model),
        "data": images.fingerprint,
        "preprocess": pre.key,
        "spec": asdict(spec),
        "bf16": bf16,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def extract(
    model: nn.Module,
    images: ImageSet,
    pre: Preprocess,
    spec: FeatureSpec = FeatureSpec(),
    cfg: FeatureConfig = FeatureConfig(),
    desc: str = "features",
) -> dict[str, torch.Tensor]:
    """Tokens of ``images`` (read from the cache when this exact extraction was done before).

    Returns:
        ``cls`` [N, L, D] float32 (L listed blocks, in block order); with ``spec.patch == "mean"``
        also ``patch_mean`` [N, D] float32; with ``"all"`` also ``patch`` [N, L, h, w, D] float16
        (h, w = input size / patch size; float16 halves the cache and RAM of dense features).
    """
    path = None
    if cfg.use_cache:
        path = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        path = path / f"{cache_key(model, images, pre, spec, cfg.bf16)}.pt"
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
    feats = _compute(model, images, pre, spec, cfg, desc)
    if path is not None:
        atomic_torch_save(feats, path)
    return feats


@torch.inference_mode()
def _compute(
    model: nn.Module, images: ImageSet, pre: Preprocess, spec: FeatureSpec, cfg: FeatureConfig, desc: str
) -> dict[str, torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    layers = list(spec.layers) if isinstance(spec.layers, tuple) else spec.layers
    parts: dict[str, list[torch.Tensor]] = {"cls": [], "patch_mean": [], "patch": []}
    n = len(images)
    with tqdm(total=n, desc=desc, unit="img", disable=not cfg.progress, leave=False) as bar:
        for start in range(0, n, cfg.batch_size):
            idx = range(start, min(n, start + cfg.batch_size))
            x = torch.stack([pre(images[i], i) for i in idx]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                outs = model.get_intermediate_layers(x, n=layers, reshape=True, return_class_token=True, norm=spec.norm)
            parts["cls"].append(torch.stack([c.float() for _, c in outs], 1).cpu())
            if spec.patch == "mean":
                parts["patch_mean"].append(outs[-1][0].float().mean(dim=(2, 3)).cpu())
            elif spec.patch == "all":
                # [B, D, h, w] per block -> [B, L, h, w, D]
                parts["patch"].append(torch.stack([p.permute(0, 2, 3, 1) for p, _ in outs], 1).half().cpu())
            bar.update(len(idx))
    return {k: torch.cat(v) for k, v in parts.items() if v}


def global_spec(model: nn.Module) -> FeatureSpec:
    """The tokens the classification protocols share (one cache entry serves k-NN, linear and
    logistic regression): normalised class tokens of the last 4 blocks + mean patch token of the last."""
    return FeatureSpec(layers=min(4, model.n_blocks), norm=True, patch="mean")


def keeps_global_rng(fn):
    """Run ``fn`` on a copy of the global RNG state (CPU and every CUDA device) and restore it afterwards, so
    an evaluation that seeds its head initialisation (``torch.manual_seed(cfg.seed)``) does not reseed its caller."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper
