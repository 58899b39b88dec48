"""Building a backbone by name, optionally with local weights (no downloads, ever)."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Iterator

from dinolab.models.checkpoints import infer_arch_kwargs, load_backbone_weights, read_arch_kwargs, read_state_dict
from dinolab.models.registry import resolve_arch
from dinolab.models.vit import DinoVisionTransformer


def build_backbone(arch: str | None, weights: str | Path | dict | None = None, **overrides) -> DinoVisionTransformer:
    """A :class:`DinoVisionTransformer` for ``arch`` (see :func:`dinolab.models.arch_names`).

    Args:
        arch: ``vits14``, ``vitb14_reg``, ``vit_small`` ..., or None / ``"auto"`` to read the
            architecture off ``weights``: the constructor arguments a dinolab ``.safetensors``
            stores, else sizes, patch, registers and FFN read from the shapes (64 dims per head,
            as every official model).
        weights: a local ``.pth`` / ``.safetensors`` file (official, dinolab or Hugging Face layout),
            a state dict, or None for the official random initialisation.
        overrides: constructor keyword arguments (``img_size``, ``drop_path_rate`` ...).
    """
    auto = arch in (None, "auto")
    if auto and weights is None:
        raise ValueError("arch 'auto' needs weights to read the architecture from")
    name, stored = None, None
    if weights is not None and not isinstance(weights, dict):
        name = str(weights)
        if auto:
            with _refuse_non_weights(weights):
                stored = read_arch_kwargs(weights)
        weights = read_weights(weights)
    if auto:
        try:
            stored = stored or infer_arch_kwargs(weights)
        except KeyError as err:
            raise ValueError(f"{name or 'the state dict'}: cannot read the architecture off these weights "
                             f"(no {err.args[0]!r} tensor): are they a backbone? else give the arch (--arch)") from None
        model = DinoVisionTransformer(**{**stored, **overrides})
    else:
        model = DinoVisionTransformer(**resolve_arch(arch, **overrides))
    if weights is not None:
        load_backbone_weights(model, weights, name=name)
    return model


WEIGHTS_FORMATS = "a .pth/.pt torch state dict or a .safetensors file"


def read_weights(path: str | Path) -> dict:
    """:func:`~dinolab.models.checkpoints.read_state_dict`, refusing in one line a file that is not
    a weights file (a text file, a truncated download, another pickle), instead of the loader's
    own message (``torch.load`` says ``KeyError: 101`` for some text files).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a weights file, or one ``torch.load(weights_only=True)`` refuses to unpickle.
    """
    with _refuse_non_weights(path):
        return read_state_dict(path)


@contextlib.contextmanager
def _refuse_non_weights(path: str | Path) -> Iterator[None]:
    from safetensors import SafetensorError

    from dinolab.utils.io import unpickling_reason

    try:
        yield
    except pickle.UnpicklingError as err:
        reason = unpickling_reason(err)
        if reason.startswith("Unsupported global"):  # a real pickle holding Python objects: never unpickled
            raise ValueError(f"{path} holds Python objects that safe loading refuses ({reason}); "
                             f"expected {WEIGHTS_FORMATS} of tensors") from None
        raise ValueError(f"{path} is not a weights file (expected {WEIGHTS_FORMATS})") from None
    except (KeyError, EOFError, RuntimeError, SafetensorError, UnicodeDecodeError) as err:
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err) and "zip" not in str(err):
            raise
        raise ValueError(f"{path} is not a weights file (expected {WEIGHTS_FORMATS})") from None
