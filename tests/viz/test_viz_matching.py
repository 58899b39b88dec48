"""Patch matching: Hungarian assignment, mirrored images, non-maximum suppression, and `viz match`."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dinolab.viz.matching import GAP_PIXELS, MatchConfig, Matches, match_features, match_patches, suppress_non_maxima
from dinolab.viz.patches import PatchFeatures
from dinolab.viz.pca import PCAConfig

PATCH = 4


def patchwise_flat_image(rows: int, cols: int, seed: int = 0) -> Image.Image:
    """Each PATCH x PATCH patch one random flat colour, so mirroring the image only permutes patches."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(rows, cols, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(colours, np.ones((PATCH, PATCH, 1), dtype=np.uint8)))


def content_features(image: Image.Image) -> PatchFeatures:
    """Features that are a fixed function of each patch's content (a random 2-layer map of its pixels)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H, W, 3]
    h, w = pixels.shape[0] // PATCH, pixels.shape[1] // PATCH
    patches = pixels.reshape(h, PATCH, w, PATCH, 3).permute(0, 2, 1, 3, 4).reshape(h, w, -1)
    gen = torch.Generator().manual_seed(123)
    w1, w2 = torch.randn(patches.shape[-1], 64, generator=gen), torch.randn(64, 24, generator=gen)
    return PatchFeatures(image=image, patches=torch.tanh(patches @ w1) @ w2, cls=torch.zeros(24))


def test_mirrored_image_matches_mirrored_positions():
    image = patchwise_flat_image(6, 9)
    a, b = content_features(image), content_features(ImageOps.mirror(image))
    cfg = MatchConfig(max_matches=1000, nms_radius=0, foreground=PCAConfig(foreground=False))
    matches = match_features(a, b, cfg)
    assert len(matches) == 6 * 9
    np.testing.assert_array_equal(matches.dst[:, 0], matches.src[:, 0])
    np.testing.assert_array_equal(matches.dst[:, 1], 9 - 1 - matches.src[:, 1])
    np.testing.assert_allclose(matches.distance, 0.0, atol=1e-4)


def test_mirrored_foreground_subset_matches_mirrored_positions():
    gen = torch.Generator().manual_seed(0)
    grid_a = torch.randn(5, 7, 8, generator=gen)
    grid_b = grid_a.flip(1)
    mask_a = np.zeros((5, 7), dtype=bool)
    mask_a[1:4, 1:3] = True
    matches = match_patches(grid_a, grid_b, mask_a, mask_a[:, ::-1].copy())
    assert len(matches) == 6
    np.testing.assert_array_equal(matches.dst[:, 1], 7 - 1 - matches.src[:, 1])


def test_assignment_is_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(1)
    grid_a, grid_b = torch.randn(2, 2, 5, generator=gen), torch.randn(2, 2, 5, generator=gen)
    matches = match_patches(grid_a, grid_b)
    dist = torch.cdist(grid_a.reshape(4, 5).double(), grid_b.reshape(4, 5).double()).numpy()
    best = min(sum(dist[i, p[i]] for i in range(4)) for p in itertools.permutations(range(4)))
    assert matches.distance.sum() == pytest.approx(best, rel=1e-12)
    assert (np.diff(matches.distance) >= 0).all(), "pairs come sorted by distance"


def test_nms_keeps_the_best_pair_of_each_neighbourhood():
    src = np.array([[0, 0], [0, 1], [5, 5], [0, 3], [5, 6]])
    dst = np.array([[0, 0], [3, 3], [5, 5], [9, 9], [1, 1]])
    matches = Matches(src, dst, np.arange(5, dtype=float))
    # radius 1: pair 1 is next to pair 0 in A; pair 4 next to pair 2 in A; pair 3 is 3 columns from pair 0.
    kept = suppress_non_maxima(matches, radius=1, max_matches=10)
    np.testing.assert_array_equal(kept.distance, [0.0, 2.0, 3.0])
    # A neighbour in B alone also suppresses: move pair 3's B end next to pair 0's.
    dst_near = dst.copy()
    dst_near[3] = [1, 1]
    kept = suppress_non_maxima(Matches(src, dst_near, np.arange(5.0)), radius=1, max_matches=10)
    np.testing.assert_array_equal(kept.distance, [0.0, 2.0])
    assert len(suppress_non_maxima(matches, radius=1, max_matches=2)) == 2


def test_nms_result_is_spread_out():
    gen = torch.Generator().manual_seed(2)
    grid = torch.randn(10, 10, 6, generator=gen)
    kept = suppress_non_maxima(match_patches(grid, grid + 0.1 * torch.randn(10, 10, 6, generator=gen)), 2, 50)
    for i, j in itertools.combinations(range(len(kept)), 2):
        assert np.abs(kept.src[i] - kept.src[j]).max() > 2
        assert np.abs(kept.dst[i] - kept.dst[j]).max() > 2


def test_viz_match_command_draws_both_images(run_viz, make_object_image, tmp_path):
    path_a, path_b = tmp_path / "a.png", tmp_path / "b.png"
    make_object_image().save(path_a)
    ImageOps.mirror(make_object_image()).save(path_b)
    out = tmp_path / "matches.png"
    code = run_viz(["viz", "match", str(path_a), str(path_b), "--size", "32", "--no-foreground", "--out", str(out)])
    assert code == 0
    with Image.open(out) as png:
        assert png.size == (32 + GAP_PIXELS + 32, 32 + 30)
