"""Class-token attention maps: softmax rows, token split with registers, and `viz attention`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.viz.attention import class_attention, split_class_row
from dinolab.viz.patches import fit_to_patch_grid, image_to_input


def test_last_self_attention_rows_sum_to_one(tiny_model, make_object_image):
    x = image_to_input(fit_to_patch_grid(make_object_image(), 48, 8), tiny_model)  # 6x6 patches
    with torch.inference_mode():
        attn = tiny_model.get_last_self_attention(x)
    tokens = 1 + tiny_model.num_register_tokens + 6 * 6
    assert attn.shape == (1, tiny_model.num_heads, tokens, tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, tiny_model.num_heads, tokens))
    assert (attn >= 0).all()


def test_split_puts_registers_after_the_class_token_and_patches_row_major():
    heads, registers, h, w = 2, 3, 2, 4
    tokens = 1 + registers + h * w
    attn = torch.zeros(1, heads, tokens, tokens)
    attn[0, :, 0] = torch.arange(tokens, dtype=torch.float32)  # value = token index
    to_self, regs, patches = split_class_row(attn, registers, (h, w))
    assert to_self.tolist() == [[0.0, 0.0]]
    assert regs[0, 0].tolist() == [1.0, 2.0, 3.0]
    # Patch (r, c) is token 1 + R + r * w + c.
    assert patches[0, 1, 1, 2].item() == 1 + registers + 1 * w + 2
    with pytest.raises(ValueError, match="does not fit"):
        split_class_row(attn, 0, (h, w))  # forgetting the registers is caught, not silently reshaped


def test_class_attention_accounts_for_the_whole_row(tiny_model, make_object_image):
    att = class_attention(tiny_model, make_object_image(), size=32)
    assert att.patches.shape == (tiny_model.num_heads, 4, 4)
    assert att.registers.shape == (tiny_model.num_heads, tiny_model.num_register_tokens)
    total = att.to_self + att.registers.sum(1) + att.patches.sum((1, 2))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--show-registers"]])
def test_viz_attention_command_writes_a_grid(run_viz, image_files, tmp_path, extra):
    out = tmp_path / "attention.png"
    assert run_viz(["viz", "attention", str(image_files[0]), "--size", "32", "--out", str(out), *extra]) == 0
    with Image.open(out) as png:
        # image + mean + 2 heads = 4 panels in one row of at most 4 columns.
        title = 30 + (14 if extra else 0)
        assert png.size == (4 * 32, 32 + title)
