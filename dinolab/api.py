"""One Python call per job: :func:`train` (what ``dinolab train`` does) and :func:`embed` (what ``dinolab extract``
does, in memory). Both are exported at the top level: ``dinolab.train(...)``, ``dinolab.embed(...)``.

    import dinolab
    summary = dinolab.train(data="photos/", output="runs/photos", optim__base_lr=1e-3)
    feats = dinolab.embed("photos/", "runs/photos")            # {"cls_tokens": [N, D], "paths": [...], ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn


def _override(key: str, value: Any) -> str:
    """``optim__base_lr=1e-3`` -> ``"optim.base_lr=0.001"`` (the CLI's ``key=value`` syntax)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(str(v) for v in value) + "]"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return f"{key.replace('__', '.')}={text}"


def train_argv(data=None, output="runs/dinolab", preset=None, *, eval_data=None, adapt=None, init_from=None,
               distill_from=None, high_res=None, resume=True, progress=True, overrides: Sequence[str] = (),
               **dotted: Any) -> list[str]:
    """The ``dinolab train`` command line that :func:`train` runs (keyword ``a__b=v`` is override ``a.b=v``)."""
    argv = ["train", "--output", str(output)]
    for flag, value in (("--data", data), ("--eval-data", eval_data), ("--preset", preset), ("--adapt", adapt),
                        ("--init-from", init_from), ("--distill-from", distill_from), ("--high-res", high_res)):
        if value is not None:
            argv += [flag, str(value)]
    if not resume:
        argv.append("--no-resume")
    if not progress:
        argv.append("--no-progress")
    return argv + list(overrides) + [_override(k, v) for k, v in dotted.items()]


def train(data=None, output="runs/dinolab", preset=None, **kwargs: Any) -> dict:
    """Pretrain (or resume, or adapt) exactly as ``dinolab train`` would with the same arguments; returns the
    run's summary (``summary.json``).

    Args:
        data: a folder of images, a ``.txt`` list, an ``.npz`` or a ``.jsonl`` manifest; None: the embedded digits.
        output: the run folder (resumed when it holds a checkpoint of the same config).
        preset: a preset name or YAML path (default as the CLI: ``cpu`` with data, ``demo`` without).
        kwargs: the CLI's flags by their long names (``eval_data``, ``adapt``, ``init_from``, ``distill_from``,
            ``high_res``, ``resume``, ``progress``), ``overrides=["optim.base_lr=1e-3", ...]``, or overrides as
            keywords with ``__`` for the dots (``optim__base_lr=1e-3``).

    Raises:
        ValueError, FileNotFoundError: bad input, in one line, before any work.
    """
    import argparse

    from dinolab.train import cli as train_cli
    from dinolab.train.loop import train as train_loop

    parser = argparse.ArgumentParser(prog="dinolab")
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(train_argv(data, output, preset, **kwargs))
    cfg = train_cli.build_config(args)
    train_cli.validate_run(cfg, args.output)
    return train_loop(cfg, args.output, resume=not args.no_resume, progress=not args.no_progress)


def embed(images, model: str | Path | nn.Module | None = None, *, arch: str | None = None, size: int | None = None,
          batch_size: int = 32, patch_tokens: bool = False, layers: int = 1, bf16: bool = False,
          progress: bool = True) -> dict:
    """Features of ``images`` with the official evaluation preprocessing (resize ``size * 256/224``, centre crop).

    Args:
        images: a folder, an image file, a ``.txt`` list, a sequence of paths, PIL images, or a uint8 array
            [N, H, W, 3].
        model: a run folder, a weights file, a backbone module, or None (``arch``, random init: for trying only).
        size: crop size; default the model's own (a run's global crop size, the weights' grid, at most 224 px
            for patch 14).

    Returns:
        ``cls_tokens`` [N, D] (``[N, L, D]`` for ``layers > 1``), with ``patch_tokens`` [N, P, D] if asked; for
        paths also ``paths`` (the readable ones, in order) and ``skipped``.
    """
    from dinolab.features.files import ExtractConfig, embed_arrays, extract_features
    from dinolab.models.resolve import native_input_size, resize_for, resolve_backbone

    if isinstance(model, nn.Module):
        backbone, default_size = model, native_input_size(model)
    else:
        is_run = model is not None and Path(model).is_dir()
        resolved = resolve_backbone(weights=None if is_run else model, run=model if is_run else None, arch=arch)
        backbone, default_size = resolved.model, resolved.input_size
    size = size or default_size
    cfg = ExtractConfig(batch_size=batch_size, size=size, resize=resize_for(size), patch_tokens=patch_tokens,
                        layers=layers, bf16=bf16, progress=progress)
    pictures = _in_memory_images(images)
    if pictures is None:
        from dinolab.data.images import resolve_image_source

        paths = [Path(p) for p in images] if isinstance(images, (list, tuple)) else resolve_image_source(images)
        if not paths:
            raise ValueError(f"no image files found in {images}")
        return extract_features(backbone, paths, cfg)
    return embed_arrays(backbone, pictures, cfg)[0]


def _in_memory_images(images) -> list | None:
    """PIL RGB images from a uint8 array [N, H, W, 3] or a sequence of PIL images; None for paths."""
    from PIL import Image

    from dinolab.data.images import to_rgb

    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images: expected a uint8 array [N, H, W, 3], got {images.dtype} {images.shape}")
        return [Image.fromarray(a) for a in images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        return [to_rgb(p) for p in images]
    return None
