"""Weights: official key layout, training-checkpoint layouts, safetensors, Hugging Face parity."""

import pytest
import torch

import dinolab
from dinolab.models import DinoVisionTransformer, build_backbone
from dinolab.models.checkpoints import load_backbone_weights, read_state_dict, save_backbone
from dinolab.models.convert import convert
from dinolab.models.hf import hf_to_official, official_to_hf, to_hf_model


def official_vits14_shapes(registers: int) -> dict[str, tuple]:
    """The key -> shape table of the released dinov2_vits14(_reg4)_pretrain.pth, written out by hand."""
    D, H = 384, 1536
    shapes = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + 37 * 37, D),
        "mask_token": (1, D),
        "patch_embed.proj.weight": (D, 3, 14, 14),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, D)
    for i in range(12):
        for k, s in {
            "norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
            "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ls1.gamma": (D,), "norm2.weight": (D,),
            "norm2.bias": (D,), "mlp.fc1.weight": (H, D), "mlp.fc1.bias": (H,), "mlp.fc2.weight": (D, H),
            "mlp.fc2.bias": (D,), "ls2.gamma": (D,),
        }.items():
            shapes[f"blocks.{i}.{k}"] = s
    return shapes


@pytest.mark.parametrize("ctor, registers", [(dinolab.dinov2_vits14, 0), (dinolab.dinov2_vits14_reg, 4)])
def test_official_state_dict_loads_strict(ctor, registers, tmp_path):
    torch.manual_seed(0)
    official = {k: torch.randn(s) for k, s in official_vits14_shapes(registers).items()}
    path = tmp_path / "official.pth"
    torch.save(official, path)
    model = ctor(weights=path)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_vits14_shapes(registers)
    torch.testing.assert_close(model.state_dict()["blocks.3.attn.qkv.weight"], official["blocks.3.attn.qkv.weight"])


def small(**kw):
    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, **kw).eval()
    with torch.no_grad():  # LayerScale 1e-5 would hide block errors: make every block matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_training_checkpoint_with_chunks_and_prefixes(tmp_path):
    m = small()
    sd = m.state_dict()
    chunked = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 1}.{k[len('blocks.'):]}"  # chunk index == block index // chunk size (1)
        chunked[f"teacher.backbone.{k}"] = v
        chunked[f"student.backbone.{k}"] = torch.zeros_like(v)
    torch.save({"model": chunked, "iteration": 7}, tmp_path / "train.pth")
    other = small()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_backbone_weights(other, tmp_path / "train.pth")
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(other(x), m(x))  # the teacher was loaded, not the zeroed student


def test_safetensors_round_trip(tmp_path):
    m = small(num_register_tokens=4)
    save_backbone(m, tmp_path / "w.safetensors")
    assert set(read_state_dict(tmp_path / "w.safetensors")) == set(m.state_dict())
    other = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_register_tokens=4)
    load_backbone_weights(other, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 42, 28)
    torch.testing.assert_close(other.eval()(x), m(x))


def test_weights_of_another_arch_give_one_clear_line(tmp_path):
    save_backbone(small(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"embed_dim 32.*do not fit the model \(embed_dim 384"):
        build_backbone("vits14", weights=tmp_path / "small.pth")


def test_pos_embed_of_another_grid_is_resampled(tmp_path):
    save_backbone(small(), tmp_path / "w.pth")  # 4x4 grid
    m = DinoVisionTransformer(img_size=98, patch_size=14, embed_dim=32, depth=2, num_heads=2)
    load_backbone_weights(m, tmp_path / "w.pth")
    assert m.pos_embed.shape == (1, 1 + 49, 32)


@pytest.mark.parametrize("naming", ["v4", "v5"])
def test_hf_key_round_trip(naming):
    sd = small(num_register_tokens=4, ffn_layer="swiglufused").state_dict()
    back = hf_to_official(official_to_hf(sd, naming=naming))
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k])


@pytest.mark.parametrize("registers, ffn", [(0, "mlp"), (4, "mlp"), (0, "swiglufused")])
def test_equal_to_transformers_at_native_resolution(registers, ffn):
    """At the stored grid (518 for the released weights; 56 here) nothing is resampled."""
    off = 0.0 if registers else 0.1
    m = small(num_register_tokens=registers, ffn_layer=ffn, interpolate_offset=off, interpolate_antialias=bool(registers))
    hf = to_hf_model(m)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = m.norm(m.forward_features(x)["x_prenorm"])
        theirs = hf(pixel_values=x).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-4


def test_equal_to_transformers_registers_at_other_sizes():
    """Register models: both use an exact output size with antialias, so they agree at every size."""
    m = small(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    hf = to_hf_model(m)
    for h, w in ((28, 28), (98, 98), (42, 70)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            diff = (m.norm(m.forward_features(x)["x_prenorm"]) - hf(pixel_values=x).last_hidden_state).abs().max()
        assert diff <= 1e-4, (h, w)


def test_plain_models_differ_from_transformers_off_grid_only_by_the_offset():
    """HF's plain Dinov2 resamples without the official 0.1 offset: equal with offset 0, not with 0.1."""
    x = torch.randn(1, 3, 98, 98)
    for offset, equal in ((0.0, True), (0.1, False)):
        m = small(interpolate_offset=offset)
        hf = to_hf_model(m)
        with torch.no_grad():
            diff = (m.norm(m.forward_features(x)["x_prenorm"]) - hf(pixel_values=x).last_hidden_state).abs().max()
        assert (diff <= 1e-4) == equal


def test_convert_cli_round_trip_through_hf(tmp_path):
    m = small(num_register_tokens=4)
    save_backbone(m, tmp_path / "a.pth")
    convert(tmp_path / "a.pth", tmp_path / "hf.safetensors", to="hf")
    assert "embeddings.register_tokens" in read_state_dict(tmp_path / "hf.safetensors")
    convert(tmp_path / "hf.safetensors", tmp_path / "b.pth", to="official")
    back = read_state_dict(tmp_path / "b.pth")
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back[k], v)
