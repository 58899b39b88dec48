"""Embedded real image data: what ``dinolab train`` uses when given no ``--data``. No downloads.

scikit-learn (a dinolab dependency) ships real data inside its wheel:

- ``load_digits``: 1,797 handwritten digits, 8 x 8 greyscale, 10 classes (the test set of
  UCI optical digits). :func:`load_builtin` upscales them (bicubic) so a ViT with small
  patches sees more than one token, and splits them once and for all (stratified, seed 0).
- ``load_sample_images``: two 427 x 640 photographs (``china.jpg``, ``flower.jpg``), for demos.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dinolab.data.splits import stratified_split

BUILTIN_PREFIX = "builtin:"  # a data path naming an embedded set: builtin:digits
BUILTIN_SETS = ("digits",)


def load_builtin(
    name: str = "digits", *, image_size: int = 32, test_fraction: float = 1 / 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small real labelled image set shipped by an installed dependency, split into train / test.

    Args:
        name: one of :data:`BUILTIN_SETS`.
        image_size: side of the returned square images (bicubic upscaling from 8 x 8).
        test_fraction: share of each class held out (default 1/3: 599 test digits).
        seed: split seed; the default split is fixed across runs and machines.

    Returns:
        ``x_train`` uint8 [N, S, S, 3], ``y_train`` int64 [N], ``x_test`` uint8 [M, S, S, 3],
        ``y_test`` int64 [M], with ``S = image_size``.

    Raises:
        ValueError: unknown ``name`` or a non-positive ``image_size``.
    """
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown builtin data set {name!r}; available: {', '.join(BUILTIN_SETS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    images, labels = _digits(image_size)
    train, test = stratified_split(labels, test_fraction, seed)
    return images[train], labels[train], images[test], labels[test]


def _digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 RGB [1797, S, S, 3] and int64 labels [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are ink counts 0..16 (4x4 blocks of a 32x32 bitmap); stretch to 0..255.
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    if image_size != small.shape[1]:
        size = (image_size, image_size)
        small = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC)) for im in small])
    return np.repeat(small[..., None], 3, axis=-1), digits.target.astype(np.int64)


def sample_photos() -> list[Image.Image]:
    """The two photographs scikit-learn ships (China, a flower), as PIL RGB images (640 x 427)."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(im).convert("RGB") for im in load_sample_images().images]
