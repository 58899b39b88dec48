"""Frozen features for the evaluation protocols, extracted once and cached on disk.

:func:`extract` runs the core (:func:`dinolab.features.embed.embed`) over an image set and stores the
result under ``cache_dir/<key>.pt`` where ``key`` hashes the model (architecture and every weight),
the image content (the set's ``fingerprint``), the preprocessing and the requested tokens, so a second
protocol on the same model and data (k-NN then linear, linear then logistic regression ...) reads the
file instead of running the backbone. Files are written atomically; a stale or foreign file can never
be picked up because any change of weights, data or preprocessing changes the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from dinolab.features.embed import EmbedOptions, FeatureSpec, embed
from dinolab.features.inputs import Preprocess
from dinolab.utils.io import atomic_torch_save

CACHE_FORMAT_VERSION = 1  # bump when the stored layout changes


class FingerprintedImages(Protocol):
    """A sequence of images that names its content (:class:`dinolab.data.labelled.ImageSet`)."""

    fingerprint: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int): ...


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


def cache_key(model: nn.Module, images: FingerprintedImages, pre: Preprocess, spec: FeatureSpec, bf16: bool) -> str:
    spec_fields = {k: v for k, v in asdict(spec).items() if k != "registers" or v}  # older keys stay valid
    parts = {
        "version": CACHE_FORMAT_VERSION,
        "model": model_fingerprint(model),
        "data": images.fingerprint,
        "preprocess": pre.key,
        "spec": spec_fields,
        "bf16": bf16,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def extract(
    model: nn.Module,
    images: FingerprintedImages,
    pre: Preprocess,
    spec: FeatureSpec = FeatureSpec(),
    cfg: FeatureConfig = FeatureConfig(),
    desc: str = "features",
) -> dict[str, torch.Tensor]:
    """Tokens of ``images`` (read from the cache when this exact extraction was done before).

    Returns:
        the core's tokens (:mod:`dinolab.features.embed`): ``cls`` [N, L, D] float32, ``patch_mean`` [N, D]
        float32, ``patch`` [N, L, h, w, D] stored as float16 (halves the cache and RAM of dense features).
    """
    path = None
    if cfg.use_cache:
        path = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        path = path / f"{cache_key(model, images, pre, spec, cfg.bf16)}.pt"
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
    options = EmbedOptions(batch_size=cfg.batch_size, bf16=cfg.bf16, progress=cfg.progress, desc=desc,
                           patch_dtype=torch.float16)
    feats = embed(model, images, pre, spec, options).tokens
    if path is not None:
        atomic_torch_save(feats, path)
    return feats
