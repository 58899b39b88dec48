from __future__ import annotations

import pytest
import torch
from torch import nn

from dinolab.models.heads import DINOHead
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train.param_groups import (
    ParamGroupConfig,
    apply_schedule,
    backbone_layer_id,
    build_param_groups,
    param_settings,
)


def _student() -> nn.ModuleDict:
    backbone = DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_register_tokens=2
    )
    head = lambda: DINOHead(in_dim=32, out_dim=20, hidden_dim=16, bottleneck_dim=8)  # noqa: E731
    return nn.ModuleDict({"backbone": backbone, "dino_head": head(), "ibot_head": head()})


def _expected(name: str) -> tuple[float, float, bool]:
    """The rules by hand for L = 2 blocks and decay 0.9: (lr multiplier, wd multiplier, is_last_layer)."""
    tokens = ("backbone.cls_token", "backbone.pos_embed", "backbone.register_tokens", "backbone.mask_token")
    no_wd = name in tokens or name.endswith(".bias") or "norm" in name or name.endswith("gamma")
    wd = 0.0 if no_wd else 1.0
    if name in tokens:
        return 0.9**3, wd, False  # layer 0
    if name.startswith("backbone.patch_embed"):
        return 0.9**3 * 0.2, wd, False  # layer 0, x 0.2
    if name.startswith("backbone.blocks.0."):
        return 0.9**2, wd, False
    if name.startswith("backbone.blocks.1."):
        return 0.9, wd, False
    return 1.0, wd, "last_layer" in name  # final norm and heads: layer L + 1


def test_every_parameter_gets_the_hand_computed_multipliers():
    student = _student()
    settings = param_settings(student)
    assert [s["name"] for s in settings] == [n for n, _ in student.named_parameters()]
    for s in settings:
        expected = _expected(s["name"])
        assert (s["lr_multiplier"], s["wd_multiplier"], s["is_last_layer"]) == pytest.approx(expected), s["name"]
    by_name = {s["name"]: s for s in settings}
    assert by_name["backbone.blocks.1.ls1.gamma"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["dino_head.last_layer.parametrizations.weight.original1"]["is_last_layer"]


def test_groups_are_fused_by_multipliers_and_cover_each_parameter_once():
    student = _student()
    groups = build_param_groups(student)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # tokens, patch-embed weight, patch-embed bias, block 0 x {wd, no wd}, block 1 x {wd, no wd},
    # top (norm + heads) x {wd, no wd}, last layers
    assert len(groups) == 10
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in student.parameters())
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])
        for name in g["param_names"]:
            assert (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) == pytest.approx(_expected(name))


def test_apply_schedule_with_adamw():
    student = _student()
    optimizer = torch.optim.AdamW(build_param_groups(student), betas=(0.9, 0.999))
    apply_schedule(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0)
    for g in optimizer.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected_lr)
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    # a step with lr 0 on the last layer leaves the prototypes untouched
    before = student["dino_head"].last_layer.parametrizations.weight.original1.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    student["dino_head"](student["backbone"](x)).sum().backward()
    optimizer.step()
    torch.testing.assert_close(student["dino_head"].last_layer.parametrizations.weight.original1, before)


def test_frozen_parameters_are_left_out_and_decay_one_is_flat():
    student = _student()
    student["backbone"].mask_token.requires_grad_(False)
    names = [n for g in build_param_groups(student) for n in g["param_names"]]
    assert "backbone.mask_token" not in names
    flat = param_settings(student, ParamGroupConfig(layerwise_decay=1.0, patch_embed_lr_mult=1.0))
    assert {s["lr_multiplier"] for s in flat} == {1.0}


def test_layer_ids_of_official_names():
    assert backbone_layer_id("pos_embed", 12) == 0
    assert backbone_layer_id("register_tokens", 12) == 0
    assert backbone_layer_id("patch_embed.proj.weight", 12) == 0
    assert backbone_layer_id("blocks.0.attn.qkv.weight", 12) == 1
    assert backbone_layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert backbone_layer_id("blocks.1.5.attn.qkv.weight", 12) == 6  # FSDP chunk 1, global block 5
    assert backbone_layer_id("norm.weight", 12) == 13


def test_bad_inputs():
    with pytest.raises(ValueError, match="backbone"):
        build_param_groups(nn.ModuleDict({"dino_head": nn.Linear(2, 2)}))
    with pytest.raises(ValueError, match="layerwise_decay"):
        ParamGroupConfig(layerwise_decay=0.0)
