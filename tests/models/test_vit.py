"""Backbone behaviour: official API semantics, attention paths, masks, packing, drop path, errors."""

import math

import numpy as np
import pytest
import torch

from dinolab.models import DinoVisionTransformer, build_backbone


def tiny(**kw) -> DinoVisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=2, init_values=1.0)
    args.update(kw)
    return DinoVisionTransformer(**args).eval()


def test_forward_features_keys_and_shapes():
    m = tiny(num_register_tokens=4)
    out = m.forward_features(torch.randn(2, 3, 42, 70))
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 32)
    assert out["x_norm_regtokens"].shape == (2, 4, 32)
    assert out["x_norm_patchtokens"].shape == (2, 3 * 5, 32)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 15, 32)
    torch.testing.assert_close(m(torch.randn(2, 3, 42, 70)).shape, torch.Size([2, 32]))


def test_forward_returns_normalised_class_token():
    m = tiny()
    x = torch.randn(2, 3, 56, 56)
    out = m.forward_features(x)
    torch.testing.assert_close(m(x), out["x_norm_clstoken"])
    torch.testing.assert_close(m.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])


def test_sdpa_equals_explicit_softmax():
    m = tiny(num_register_tokens=2)
    x = torch.randn(2, 3, 56, 42)
    fused = m.forward_features(x)["x_prenorm"]
    m.set_fused_attn(False)
    explicit = m.forward_features(x)["x_prenorm"]
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_attention_rows_sum_to_one():
    m = tiny(num_register_tokens=4)
    attn = m.get_last_self_attention(torch.randn(2, 3, 28, 42))
    assert attn.shape == (2, 2, 1 + 4 + 6, 1 + 4 + 6)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 11))


def _manual_block_outputs(m, x):
    t = m.prepare_tokens_with_masks(x)
    outs = []
    for blk in m.blocks:
        t = blk(t)
        outs.append(t)
    return outs


def test_get_intermediate_layers_int_and_list():
    m = tiny(depth=4, num_register_tokens=1)
    x = torch.randn(2, 3, 28, 56)
    ref = _manual_block_outputs(m, x)
    last2 = m.get_intermediate_layers(x, n=2)
    assert len(last2) == 2
    torch.testing.assert_close(last2[0], m.norm(ref[2])[:, 2:])
    torch.testing.assert_close(last2[1], m.norm(ref[3])[:, 2:])
    picked = m.get_intermediate_layers(x, n=[0, 2], norm=False, return_class_token=True)
    torch.testing.assert_close(picked[0][0], ref[0][:, 2:])
    torch.testing.assert_close(picked[1][1], ref[2][:, 0])
    (grid,) = m.get_intermediate_layers(x, n=1, reshape=True)
    assert grid.shape == (2, 32, 2, 4)
    # reshape is row-major over the patch grid: channel vector at (row 1, col 3) is patch 1*4+3
    torch.testing.assert_close(grid[:, :, 1, 3], last2[1][:, 7])


def test_masks_replace_exactly_the_masked_patch_embeddings():
    m = tiny()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[1, 15] = True
    plain = m.prepare_tokens_with_masks(x)
    masked = m.prepare_tokens_with_masks(x, masks)
    pos = m.interpolate_pos_encoding(torch.zeros(1, 17, m.embed_dim), 56, 56)
    changed = (plain != masked).any(-1)  # [B, 1+N]
    assert torch.equal(changed[:, 1:], masks) and not changed[:, 0].any()
    torch.testing.assert_close(masked[0, 2], m.mask_token[0] + pos[0, 2])
    out = m.forward_features(x, masks=masks)
    assert out["masks"] is masks


def test_packed_groups_equal_separate_forwards():
    m = tiny(num_register_tokens=2)
    g, l = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    masks = torch.rand(4, 16) < 0.3
    packed = m.forward_features([g, l], [masks, None])
    sep_g, sep_l = m.forward_features(g, masks), m.forward_features(l)
    for a, b in ((packed[0], sep_g), (packed[1], sep_l)):
        for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_varlen_attention_equals_per_group_attention_values_and_gradients():
    # one nested-jagged SDPA over all packed sequences (CUDA's varlen kernel) = one call per group;
    # float64, so that the two summation orders agree to 1e-10
    g, l = torch.randn(3, 3, 56, 56, dtype=torch.float64), torch.randn(5, 3, 28, 28, dtype=torch.float64)
    masks = torch.rand(3, 16) < 0.3
    results = []
    for varlen in (False, True):
        m = tiny(num_register_tokens=1).double().train()
        m.set_varlen_attention(varlen)
        out = m.forward_features([g, l], [masks, None])
        (out[0]["x_norm_patchtokens"].square().sum() + out[1]["x_norm_clstoken"].sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (per_group, grads_a), (varlen, grads_b) = results
    for a, b in zip(per_group, varlen):
        for k in ("x_norm_clstoken", "x_norm_patchtokens"):
            torch.testing.assert_close(a[k], b[k], atol=1e-10, rtol=1e-10)
    assert grads_a.keys() == grads_b.keys() and "blocks.0.attn.qkv.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-10, rtol=1e-10)


def test_efficient_drop_path_expectation_equals_plain_residual():
    torch.manual_seed(1)
    m = tiny(depth=1, drop_path_rate=0.5, drop_path_mode="efficient")
    blk = m.blocks[0]
    x = torch.randn(4, 5, 32)
    with torch.no_grad():
        blk.eval()
        plain = blk(x)
        blk.train()
        draws = torch.stack([blk(x) for _ in range(3000)]).mean(0)
    # each sample is in the subset with probability 2/4 and then scaled by 4/2: unbiased
    torch.testing.assert_close(draws, plain, atol=0.05, rtol=0.05)
    # and every single draw computes exactly ceil((1 - 0.5) * 4) = 2 residuals per branch
    from dinolab.layers.drop_path import subset_indices

    assert len(subset_indices(4, 0.5, x.device)) == 2
    assert len(subset_indices(5, 0.4, x.device)) == math.ceil(0.6 * 5)


def test_hub_architectures_have_official_sizes():
    expected = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
    for arch, (dim, depth, heads) in expected.items():
        m = build_backbone(arch, device="meta")
        assert (m.embed_dim, m.n_blocks, m.num_heads, m.patch_size) == (dim, depth, heads, 14)
        assert m.pos_embed.shape == (1, 1 + 37 * 37, dim)
    g = build_backbone("vitg14", device="meta").state_dict()
    assert g["blocks.0.mlp.w12.weight"].shape == (2 * 4096, 1536)  # (int(6144*2/3)+7)//8*8 = 4096
    assert g["blocks.0.mlp.w3.weight"].shape == (1536, 4096)


def _official_bicubic_1d(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """Interpolation matrix [n_out, n_in] of PyTorch's bicubic (A = -0.75, clamped borders) when a
    scale factor is given: source coordinate = (dst + 0.5) / scale - 0.5."""
    A = -0.75

    def w(t):
        t = abs(t)
        if t <= 1:
            return (A + 2) * t**3 - (A + 3) * t**2 + 1
        if t < 2:
            return A * t**3 - 5 * A * t**2 + 8 * A * t - 4 * A
        return 0.0

    mat = np.zeros((n_out, n_in))
    for d in range(n_out):
        src = (d + 0.5) / scale - 0.5
        f = math.floor(src)
        for k in range(f - 1, f + 3):
            mat[d, min(max(k, 0), n_in - 1)] += w(src - k)
    return mat


def test_official_interpolation_formula_with_offset():
    m = tiny(img_size=70, interpolate_offset=0.1)  # stored 5x5 grid
    H, W = 42, 98  # 3 x 7 patches
    pos = m.pos_embed.detach()[0, 1:].reshape(5, 5, -1).numpy()
    Rh = _official_bicubic_1d(5, 3, (3 + 0.1) / 5)
    Rw = _official_bicubic_1d(5, 7, (7 + 0.1) / 5)
    expected = np.einsum("ai,bj,ijd->abd", Rh, Rw, pos).reshape(21, -1)
    got = m.interpolate_pos_encoding(torch.zeros(1, 1 + 21, m.embed_dim), H, W).detach()[0]  # official (x, w=dim 2, h=dim 3)
    np.testing.assert_allclose(got[1:].numpy(), expected, atol=1e-5)
    torch.testing.assert_close(got[0], m.pos_embed.detach()[0, 0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tiny()(torch.randn(1, 3, 50, 56)), "not a multiple of the patch size 14"),
        (lambda: build_backbone("vit_huge"), "unknown arch 'vit_huge'"),
        (lambda: build_backbone("vits14", weights="/no/such/file.pth"), "does not exist"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call()


@pytest.mark.parametrize("packed", [False, True])
def test_activation_checkpointing_gives_equal_outputs_and_gradients(packed):
    # with random drop-path subsets: the recomputation must replay the same subsets
    m = tiny(drop_path_rate=0.4, drop_path_mode="efficient").train()
    g, l = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    masks = torch.rand(4, 16) < 0.3

    def loss_and_grads(checkpointing: bool):
        m.activation_checkpointing = checkpointing
        m.zero_grad()
        torch.manual_seed(7)
        if packed:
            outs = m.forward_features([g, l], [masks, None])
        else:
            outs = [m.forward_features(g, masks)]
        loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].sum() for o in outs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) > 10
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5, msg=name)
