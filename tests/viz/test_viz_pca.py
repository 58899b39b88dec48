"""PCA maps: the PCA itself, the foreground rule, the RGB colouring, and the `viz pca` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from dinolab.viz.pca import PCAConfig, first_component_scores, foreground_masks, pca_rgb, principal_components

GRID = (8, 8)
OBJECT = (slice(2, 6), slice(3, 7))  # a 4x4 object, off-centre, not touching the border


def object_mask() -> np.ndarray:
    mask = np.zeros(GRID, dtype=bool)
    mask[OBJECT] = True
    return mask


def two_cluster_grid(object_mean: torch.Tensor, background_mean: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[8, 8, D] features: the object patches around one mean, the background around another."""
    gen = torch.Generator().manual_seed(seed)
    dim = object_mean.numel()
    means = torch.where(torch.from_numpy(object_mask())[..., None], object_mean, background_mean)
    return means + 0.05 * torch.randn(*GRID, dim, generator=gen)


def test_principal_components_match_sklearn():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    mean, comps, var = principal_components(x, 3)
    ref = PCA(n_components=3).fit(x.double().numpy())
    np.testing.assert_allclose(mean.numpy(), ref.mean_, atol=1e-10)
    np.testing.assert_allclose(var.numpy(), ref.explained_variance_, rtol=1e-8)
    # Signs are a convention: compare up to sign, then check ours (largest loading positive).
    np.testing.assert_allclose(np.abs(comps.numpy()), np.abs(ref.components_), atol=1e-8)
    pivots = comps.abs().argmax(1)
    assert (comps[torch.arange(3), pivots] > 0).all()


def test_threshold_is_in_standard_deviations_of_the_first_component():
    # Samples on a line: scores are t / std(t) with std(ddof=1) of [-2..2] = sqrt(2.5) = 1.581.
    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    grid = (t[:, None] * torch.tensor([1.0, 0.0, 0.0])).reshape(1, 5, 3)
    np.testing.assert_allclose(first_component_scores(grid.reshape(5, 3)).numpy(), t.numpy() / 2.5**0.5, atol=1e-12)
    # threshold 0.7 std -> t > 1.107: only t = 2; threshold 0.5 std -> t > 0.79: t = 1 and 2.
    (high,) = foreground_masks([grid], PCAConfig(sign="positive", threshold=0.7))
    (low,) = foreground_masks([grid], PCAConfig(sign="positive", threshold=0.5))
    assert high.tolist() == [[False, False, False, False, True]]
    assert low.tolist() == [[False, False, False, True, True]]


@pytest.mark.parametrize("swap", [False, True], ids=["object-high", "object-low"])
@pytest.mark.parametrize("scope", ["image", "joint"])
def test_border_rule_finds_the_object_whatever_the_component_sign(swap: bool, scope: str):
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[0] = 1.0, -1.0  # along the same axis: which cluster scores positive depends on the swap
    obj, bg = (b, a) if swap else (a, b)
    grids = [two_cluster_grid(obj, bg, seed=0), two_cluster_grid(obj, bg, seed=1)]
    masks = foreground_masks(grids, PCAConfig(sign="border", scope=scope))
    for mask in masks:
        np.testing.assert_array_equal(mask, object_mask())


def test_fixed_sign_rules_are_complements():
    a = torch.zeros(16)
    a[3] = 1.0
    grid = two_cluster_grid(a, -a)
    (pos,) = foreground_masks([grid], PCAConfig(sign="positive"))
    (neg,) = foreground_masks([grid], PCAConfig(sign="negative"))
    np.testing.assert_array_equal(pos, ~neg)
    assert (pos == object_mask()).all() or (neg == object_mask()).all()


def test_no_foreground_keeps_every_patch():
    grid = two_cluster_grid(torch.ones(4), -torch.ones(4))
    (mask,) = foreground_masks([grid], PCAConfig(foreground=False))
    assert mask.all()


def test_rgb_background_black_and_each_channel_spans_unit_interval():
    gen = torch.Generator().manual_seed(0)
    grids = [torch.randn(*GRID, 10, generator=gen) for _ in range(2)]
    masks = [object_mask(), np.roll(object_mask(), 1, axis=1)]
    rgbs = pca_rgb(grids, masks)
    fg = np.concatenate([rgb[m] for rgb, m in zip(rgbs, masks)])
    for rgb, m in zip(rgbs, masks):
        assert rgb.shape == (*GRID, 3)
        assert (rgb[~m] == 0).all()
    np.testing.assert_allclose(fg.min(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(fg.max(0), 1.0, atol=1e-6)


def test_same_part_gets_the_same_colour_in_both_images():
    # Image 2 holds the same object features as image 1, moved one patch right: the joint second PCA
    # must give each object patch the same colour in both images.
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(*GRID, 12, generator=gen)
    second = torch.randn(*GRID, 12, generator=gen)
    second[2:6, 4:8] = first[OBJECT]
    mask_1, mask_2 = object_mask(), np.roll(object_mask(), 1, axis=1)
    rgb_1, rgb_2 = pca_rgb([first, second], [mask_1, mask_2])
    np.testing.assert_allclose(rgb_1[OBJECT], rgb_2[2:6, 4:8], atol=1e-6)


def test_viz_pca_command_writes_image_beside_map(run_viz, image_files, tmp_path):
    out = tmp_path / "pca.png"
    code = run_viz(["viz", "pca", *map(str, image_files), "--arch", "tiny", "--size", "32", "--out", str(out)])
    assert code == 0
    with Image.open(out) as png:
        # Two rows (one per image) of two 32x32 panels, each row with a 30-pixel title band.
        assert png.size == (2 * 32, 2 * (32 + 30))
        pixels = np.asarray(png.convert("RGB"))
    right_panel = pixels[30:62, 32:64]
    left_panel = pixels[30:62, 0:32]
    assert (right_panel.sum(-1) == 0).any(), "background patches of the map are black"
    assert (left_panel[0, 0] == 128).all(), "the image itself (grey background) is on the left"


def test_viz_pca_command_refuses_a_missing_image(run_viz, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run_viz(["viz", "pca", str(tmp_path / "nope.png"), "--size", "32"])
