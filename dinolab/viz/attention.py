"""The class token's attention in the last block, one map per head (DINO/DINOv2 attention maps).

``model.get_last_self_attention(x)`` gives the softmax attention [B, heads, T, T] with the token
order class, registers, patches: ``T = 1 + R + N``. Reshaping row 0 straight to the patch grid
breaks for register models (the "+4 tokens" of dinov2 issues #285/#373), so the row is split
explicitly. Register tokens carry no spatial position: they are left out of the maps by default;
on request their attention is written under each head's map (values and their share of the row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinolab.data.images import load_rgb
from dinolab.viz.figure import panel_figure, save_png, set_title
from dinolab.viz.patches import fit_to_patch_grid, image_to_input, upsample_grid

MAX_COLUMNS = 4


@dataclass(frozen=True)
class AttentionConfig:
    """Defaults of the attention figure.

    Attributes:
        size: shorter image side in pixels before cropping to the patch grid.
        show_registers: write the class token's attention to each register under its head's map.
        upsample: ``"nearest"`` (patch blocks) or ``"bilinear"``.
    """

    size: int = 448
    show_registers: bool = False
    upsample: str = "nearest"


@dataclass
class ClassAttention:
    """Where the class token looks, per head.

    Attributes:
        image: the image as the model saw it, ``W x H`` pixels.
        patches: float [heads, h, w] attention from the class token to each patch.
        registers: float [heads, R] attention from the class token to each register (R may be 0).
        to_self: float [heads] attention of the class token to itself.
    """

    image: Image.Image
    patches: np.ndarray
    registers: np.ndarray
    to_self: np.ndarray


def split_class_row(
    attn: torch.Tensor, num_registers: int, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the class token's row of an attention tensor by token kind.

    Args:
        attn: [B, heads, T, T] softmax attention, token order class, registers, patches.
        num_registers: R.
        grid: patch grid (h, w), with ``h * w = T - 1 - R``.

    Returns:
        to_self [B, heads], registers [B, heads, R], patches [B, heads, h, w].

    Raises:
        ValueError: T does not equal 1 + R + h * w.
    """
    h, w = grid
    tokens = attn.shape[-1]
    if tokens != 1 + num_registers + h * w:
        raise ValueError(
            f"attention over {tokens} tokens does not fit 1 class + {num_registers} registers + {h}x{w} patches"
        )
    row = attn[:, :, 0, :]  # [B, heads, T]
    patches = row[:, :, 1 + num_registers :].reshape(*row.shape[:2], h, w)
    return row[:, :, 0], row[:, :, 1 : 1 + num_registers], patches


@torch.inference_mode()
def class_attention(model: torch.nn.Module, image: Image.Image | str | Path, size: int = 448) -> ClassAttention:
    """The class token's last-block attention of one image, split into self, registers and patch maps."""
    if not isinstance(image, Image.Image):
        image = load_rgb(image)
    fitted = fit_to_patch_grid(image, size, model.patch_size)
    attn = model.get_last_self_attention(image_to_input(fitted, model)).float().cpu()
    grid = (fitted.height // model.patch_size, fitted.width // model.patch_size)
    to_self, registers, patches = split_class_row(attn, model.num_register_tokens, grid)
    return ClassAttention(fitted, patches[0].numpy(), registers[0].numpy(), to_self[0].numpy())


def _head_title(att: ClassAttention, head: int | None, show_registers: bool) -> str:
    """'head 2' or 'mean of heads', plus a second line with register attention when asked."""
    title = "mean of heads" if head is None else f"head {head}"
    if not show_registers:
        return title
    if att.registers.shape[1] == 0:
        return title + "\nno register tokens"
    regs = att.registers.mean(0) if head is None else att.registers[head]
    values = " ".join(f"{v:.3f}".removeprefix("0") for v in regs)  # ".412": keeps 4 registers within a panel
    return title + f"\nregs {values} ({100 * regs.sum():.0f}%)"


def save_attention_figure(att: ClassAttention, out: str | Path, cfg: AttentionConfig = AttentionConfig()) -> Path:
    """PNG grid: the image, the mean over heads, then one map per head (each on its own colour scale)."""
    heads = att.patches.shape[0]
    maps = [att.patches.mean(0)] + list(att.patches)
    labels: list[int | None] = [None] + list(range(heads))
    cols = min(MAX_COLUMNS, len(maps) + 1)
    rows = -(-(len(maps) + 1) // cols)
    w, h = att.image.size
    fig, axes = panel_figure(rows, cols, w, h, title_lines=2 if cfg.show_registers else 1)
    axes[0, 0].imshow(att.image)
    set_title(axes[0, 0], "image")
    for i, (grid, head) in enumerate(zip(maps, labels), start=1):
        ax = axes[i // cols, i % cols]
        ax.imshow(upsample_grid(grid, w, h, cfg.upsample), cmap="inferno")
        set_title(ax, _head_title(att, head, cfg.show_registers))
    return save_png(fig, out)
