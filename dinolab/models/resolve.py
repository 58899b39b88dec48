"""The backbone a command is given (``--run DIR``, ``--weights FILE``, ``--arch NAME``) and the input size that
fits it: the one home of that rule for ``extract``, ``eval``, ``viz``, ``serve``, ``curate`` and ``export``.

* ``--run DIR``: the teacher backbone the run exported (``DIR/teacher_backbone.safetensors``, else ``.pth``),
  built as ``DIR/config.yaml`` describes it; input size: the run's global crop size.
* ``--weights FILE``: the architecture read off the file (``--arch`` overrides); input size: the weights'
  position grid times the patch, at most 16 patches (224 px for patch 14: the official evaluation size;
  a patch-4 model trained on 32-px crops gets 32).
* neither: ``--arch`` (default ``vits14``), randomly initialised; its native size as above.

:func:`resize_for` gives the short side to resize to before the centre crop (the official 256/224 ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from dinolab.models.vit import DinoVisionTransformer

MAX_NATIVE_PATCHES = 16  # 224 px at patch 14: the official evaluation size
DEFAULT_ARCH = "vits14"


@dataclass
class ResolvedBackbone:
    """A backbone, the input size it expects (pixels, a multiple of its patch) and where it came from."""

    model: DinoVisionTransformer
    input_size: int
    info: dict = field(default_factory=dict)


def native_input_size(model: DinoVisionTransformer) -> int:
    """The weights' own position grid in pixels, capped at 16 patches."""
    patch = model.patch_size
    grid = int(round((model.pos_embed.shape[1] - 1) ** 0.5))
    return patch * min(grid, MAX_NATIVE_PATCHES)


def resize_for(size: int) -> int:
    """Short side before a ``size`` centre crop: ``size * 256 / 224`` (the official evaluation transform)."""
    return int(round(size * 256 / 224))


def run_weights(run_dir: str | Path) -> Path:
    """``RUN/teacher_backbone.safetensors`` (else ``.pth``) of a finished training run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such run directory")
    for suffix in (".safetensors", ".pth"):
        if (run_dir / f"teacher_backbone{suffix}").is_file():
            return run_dir / f"teacher_backbone{suffix}"
    raise FileNotFoundError(f"{run_dir}: no teacher_backbone.safetensors (or .pth); has the run finished?")


def run_input_size(run_dir: str | Path) -> int | None:
    """The global crop size of the run in ``run_dir`` (its ``config.yaml``), or None if it does not say."""
    from omegaconf import OmegaConf

    from dinolab.configs.schema import load_yaml

    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return None
    size = OmegaConf.select(load_yaml(cfg_path), "crops.global_crops_size")
    return int(size) if size else None


def load_backbone_from_run(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """The teacher backbone a training run exported, built as the run's config describes it.

    Reads ``run_dir/teacher_backbone.safetensors`` (else ``.pth``) and the architecture from
    ``run_dir/config.yaml``: ``student.*`` (dinolab's training schema, read by
    :func:`dinolab.models.build.backbone_kwargs`) or a plain ``model.arch``. The position-embedding grid (``img_size``)
    is read off the weights, so they load without resampling.
    """
    from omegaconf import OmegaConf

    from dinolab.configs.schema import load_yaml
    from dinolab.models.build import backbone_kwargs
    from dinolab.models.checkpoints import infer_arch_kwargs
    from dinolab.models.factory import build_backbone, read_weights

    run_dir = Path(run_dir)
    weights = run_weights(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist (needed for the architecture of --run)")
    cfg = load_yaml(cfg_path)
    student = OmegaConf.select(cfg, "student")
    arch = OmegaConf.select(cfg, "model.arch") or (student.get("arch") if student else None)
    if arch is None:
        raise ValueError(f"{cfg_path}: no student.arch or model.arch key")
    state = read_weights(weights)
    img_size = infer_arch_kwargs(state)["img_size"]
    overrides = backbone_kwargs(student, img_size) if student is not None else {"img_size": img_size}
    model = build_backbone(str(arch), weights=state, **overrides)
    return model, {"arch": str(arch), "weights": str(weights), "run": str(run_dir)}


def resolve_backbone(weights: str | Path | None = None, run: str | Path | None = None,
                     arch: str | None = None) -> ResolvedBackbone:
    """The backbone for ``--run`` / ``--weights`` / ``--arch`` and the input size that fits it.

    Raises:
        ValueError: ``--run`` together with ``--weights`` or ``--arch``; weights that are no backbone.
        FileNotFoundError: a missing run folder or weights file.
    """
    from dinolab.models.factory import build_backbone

    if run is not None:
        if weights is not None or arch not in (None, "auto"):
            raise ValueError("--run already names the weights and the architecture: drop --weights/--arch")
        model, info = load_backbone_from_run(run)
        size = run_input_size(run) or native_input_size(model)
        return ResolvedBackbone(model, size, info)
    if weights is not None:
        if not Path(weights).exists():
            raise FileNotFoundError(f"--weights {weights} does not exist")
        model = build_backbone(arch or "auto", weights=weights)
        return ResolvedBackbone(model, native_input_size(model), {"arch": arch or "auto", "weights": str(weights)})
    if arch in (None, "auto"):
        arch = DEFAULT_ARCH
    model = build_backbone(arch)
    return ResolvedBackbone(model, native_input_size(model), {"arch": arch, "weights": "random init"})
