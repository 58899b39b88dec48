"""A training config's ``student`` section -> the backbone it describes: the one home of that rule, used by
training (student and EMA teacher), distillation (the frozen teacher of another run), adaptation, high-resolution
adaptation and ``--run DIR`` (:func:`dinolab.models.resolve.load_backbone_from_run`).

The section is a :class:`~dinolab.configs.schema.StudentConfig` or the ``student`` mapping of a run's
``config.yaml`` (older runs may lack keys: the arch's own value is kept for those).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dinolab.configs.schema import Config, StudentConfig
from dinolab.models.factory import build_backbone
from dinolab.models.registry import register_interpolation
from dinolab.models.vit import DinoVisionTransformer

# student keys that are constructor arguments of the same name (None: the arch's own value)
_SAME_NAME = ("patch_size", "embed_dim", "depth", "num_heads", "ffn_layer", "num_register_tokens")


def backbone_kwargs(student: StudentConfig | Mapping[str, Any], img_size: int) -> dict:
    """Constructor overrides of the architecture ``student`` describes, with a position grid of ``img_size`` px:
    sizes, patch, FFN, registers, LayerScale (``layerscale`` -> ``init_values``) and the interpolation rule of
    :func:`~dinolab.models.registry.register_interpolation`. No drop path: that is training's own."""
    get = student.get if isinstance(student, Mapping) else lambda key: getattr(student, key, None)
    kwargs: dict[str, Any] = {"img_size": img_size}
    kwargs.update({k: get(k) for k in _SAME_NAME if get(k) is not None})
    if get("layerscale") is not None:
        kwargs["init_values"] = get("layerscale")
    kwargs.update(register_interpolation(get("num_register_tokens") or 0))
    return kwargs


def build_student_backbone(cfg: Config) -> DinoVisionTransformer:
    """The student backbone of ``cfg.student`` (loaded from ``student.pretrained_weights`` if set); position
    embeddings sized for the global crops (or ``student.img_size``: e.g. the grid of the weights it adapts)."""
    s = cfg.student
    kwargs = backbone_kwargs(s, s.img_size or cfg.crops.global_crops_size)
    kwargs.update(drop_path_rate=s.drop_path_rate, drop_path_mode=s.drop_path_mode)
    backbone = build_backbone(s.arch, weights=s.pretrained_weights, **kwargs)
    backbone.activation_checkpointing = cfg.train.activation_checkpointing  # no effect without autograd (teacher)
    backbone.set_varlen_attention(cfg.train.varlen_attention)  # only packed groups use it (the student's)
    return backbone
