"""The feature explorer's state: images of one folder (plus uploads), their features, and the queries.

This is the library behind ``dinolab serve`` (:mod:`dinolab.viz.serve` only adds HTTP). Images are
named by an id: the POSIX path relative to the root folder, or ``upload:<hash>`` for an upload
kept in memory. Every input is validated here, and a refusal is an :class:`ApiError` carrying the
HTTP status it should become: a path outside the root (403), a missing file (404), an upload too
large (413) or not an image (415), a malformed parameter (400).
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dinolab.data.images import DECODE_ERRORS, is_image_path, list_images, load_rgb, to_rgb
from dinolab.viz.patches import PatchFeatures, patch_features
from dinolab.viz.pca import PCAConfig, pca_maps_from_features

UPLOAD_PREFIX = "upload:"
UPLOAD_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/bmp": "BMP"}


class ApiError(Exception):
    """A refused request: an HTTP status and a one-line message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ExplorerConfig:
    """Defaults and limits of the explorer.

    Attributes:
        size: shorter image side in pixels before cropping to the patch grid.
        max_upload_bytes: larger uploads are refused (413) before their body is read.
        max_pixels: larger decoded images are refused (415); guards against decompression bombs.
        max_uploads: uploads kept in memory; the oldest are forgotten first.
        max_selection: images per PCA / similarity request.
        patch_cache: images whose patch features stay in memory (class tokens are all kept).
        max_neighbours: upper bound of ``k`` in a neighbour query.
    """

    size: int = 448
    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = 36_000_000
    max_uploads: int = 64
    max_selection: int = 8
    patch_cache: int = 32
    max_neighbours: int = 50


def resolve_in_root(root: Path, relative: str) -> Path:
    """The file that ``relative`` names under ``root`` (already resolved), refusing anything else.

    Raises:
        ApiError: 400 empty name; 403 the resolved path (symlinks followed) leaves ``root``;
            415 not an image suffix; 404 no such file.
    """
    if not relative or "\x00" in relative:
        raise ApiError(400, "missing or malformed image id")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"image {relative!r} is outside the served folder")
    if not is_image_path(path):
        raise ApiError(415, f"{relative!r} is not an image file (expected .jpg, .png, .webp ...)")
    if not path.is_file():
        raise ApiError(404, f"image {relative!r} not found")
    return path


def decode_upload(data: bytes, content_type: str, max_pixels: int) -> Image.Image:
    """Bytes of an uploaded image -> RGB image, checking its declared and actual format and its size.

    Raises:
        ApiError: 415 unsupported content type, undecodable bytes, format mismatch or too many pixels.
    """
    declared = UPLOAD_TYPES.get(content_type.split(";")[0].strip().lower())
    if declared is None:
        raise ApiError(415, f"upload type {content_type!r} not accepted; expected one of {', '.join(UPLOAD_TYPES)}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in UPLOAD_TYPES.values():
                raise ApiError(415, f"upload is {im.format}, not an accepted image format")
            if im.width * im.height > max_pixels:
                raise ApiError(415, f"upload is {im.width}x{im.height} pixels, more than {max_pixels}")
            im.load()
            return to_rgb(im)  # 16-bit PNGs scaled to 8 bits, not clipped white
    except DECODE_ERRORS as err:
        raise ApiError(415, f"upload is not a readable image ({err.__class__.__name__})") from err


def cosine_to_all(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of one vector with many: query [D], keys [N, D] -> [N]."""
    return F.normalize(keys.double(), dim=-1) @ F.normalize(query.double(), dim=0)


class Explorer:
    """Images of one folder and uploads, their features (cached), and the explorer's queries.

    Thread-safe: one lock serialises the model and the caches (a local tool, one user).
    """

    def __init__(self, model: torch.nn.Module, root: str | Path, cfg: ExplorerConfig = ExplorerConfig()) -> None:
        root = Path(root).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
        self.model, self.root, self.cfg = model.eval(), root, cfg
        self._lock = threading.RLock()
        self._uploads: OrderedDict[str, Image.Image] = OrderedDict()
        self._patches: OrderedDict[tuple, PatchFeatures] = OrderedDict()
        self._cls: dict[tuple, torch.Tensor] = {}

    def list_images(self) -> list[str]:
        """Ids of every image under the root, sorted (symlinks leading out of the root are left out)."""
        paths = list_images(self.root)
        return [p.relative_to(self.root).as_posix() for p in paths if p.resolve().is_relative_to(self.root)]

    def add_upload(self, data: bytes, content_type: str) -> str:
        """Keep an uploaded image in memory; returns its id (the same bytes give the same id)."""
        if len(data) > self.cfg.max_upload_bytes:
            raise ApiError(413, f"upload of {len(data)} bytes is over the limit of {self.cfg.max_upload_bytes}")
        image = decode_upload(data, content_type, self.cfg.max_pixels)
        image_id = UPLOAD_PREFIX + hashlib.sha256(data).hexdigest()[:16]
        with self._lock:
            self._uploads[image_id] = image
            self._uploads.move_to_end(image_id)
            while len(self._uploads) > self.cfg.max_uploads:
                self._uploads.popitem(last=False)
        return image_id

    def _key(self, image_id: str) -> tuple:
        """Cache key: uploads by id, files by path, size and modification time (an edited file is re-read)."""
        if image_id.startswith(UPLOAD_PREFIX):
            if image_id not in self._uploads:
                raise ApiError(404, f"upload {image_id!r} not found (uploads are kept in memory only)")
            return (image_id,)
        stat = resolve_in_root(self.root, image_id).stat()
        return (image_id, stat.st_size, stat.st_mtime_ns)

    def _load(self, image_id: str) -> Image.Image:
        if image_id.startswith(UPLOAD_PREFIX):
            return self._uploads[image_id]
        try:
            return load_rgb(resolve_in_root(self.root, image_id))
        except OSError as err:  # UnreadableImageError: truncated, not an image, a decompression bomb...
            raise ApiError(415, f"image {image_id!r} cannot be read") from err

    def features(self, image_id: str) -> PatchFeatures:
        """Patch features and class token of one image (LRU cache of ``patch_cache`` images)."""
        with self._lock:
            key = self._key(image_id)
            if key in self._patches:
                self._patches.move_to_end(key)
                return self._patches[key]
            feats = patch_features(self.model, self._load(image_id), self.cfg.size)
            self._patches[key] = feats
            self._cls[key] = feats.cls
            while len(self._patches) > self.cfg.patch_cache:
                self._patches.popitem(last=False)
            return feats

    def image_png(self, image_id: str) -> bytes:
        """The image as the model sees it (resized and cropped to the patch grid), PNG bytes."""
        return png_bytes(self.features(image_id).image)

    def _check_selection(self, ids: list[str]) -> None:
        if not ids:
            raise ApiError(400, "select at least one image")
        if len(ids) > self.cfg.max_selection:
            raise ApiError(400, f"{len(ids)} images selected; at most {self.cfg.max_selection} at once")

    def pca(self, ids: list[str], pca_cfg: PCAConfig | None = None) -> list[dict]:
        """PCA maps of the selected images, coloured together: per image its grid and a PNG data URL."""
        self._check_selection(ids)
        feats = [self.features(i) for i in ids]
        maps = pca_maps_from_features(feats, pca_cfg or PCAConfig(size=self.cfg.size))
        return [
            {
                "id": i, "grid": list(f.grid), "width": f.image.width, "height": f.image.height,
                "foreground": float(m.foreground.mean()), "pca_png": png_data_url(Image.fromarray(m.rgb_pixels())),
            }
            for i, f, m in zip(ids, feats, maps)
        ]

    def similarity(self, source: str, row: int, col: int, ids: list[str]) -> list[dict]:
        """Cosine similarity of one patch of ``source`` with every patch of each image in ``ids``.

        Returns:
            per image ``{"id", "grid": [h, w], "values": [h * w] row-major}``.
        """
        self._check_selection(ids)
        grid = self.features(source).patches
        if not (0 <= row < grid.shape[0] and 0 <= col < grid.shape[1]):
            raise ApiError(400, f"patch ({row}, {col}) outside the {grid.shape[0]}x{grid.shape[1]} grid of {source!r}")
        query = grid[row, col]
        out = []
        for image_id in ids:
            patches = self.features(image_id).patches
            sims = cosine_to_all(query, patches.reshape(-1, patches.shape[-1]))
            out.append({"id": image_id, "grid": list(patches.shape[:2]), "values": np.round(sims.numpy(), 4).tolist()})
        return out

    def _folder_class_tokens(self) -> tuple[list[str], torch.Tensor]:
        """Class tokens of every folder image (computed once, then cached): ids and [N, D]."""
        ids = self.list_images()
        missing = [i for i in ids if self._key(i) not in self._cls]
        for image_id in tqdm(missing, desc="explorer: class tokens", disable=not missing):
            try:
                self.features(image_id)
            except ApiError:
                ids.remove(image_id)  # unreadable files are not neighbours of anything
        if not ids:
            return ids, torch.empty(0)
        return ids, torch.stack([self._cls[self._key(i)] for i in ids])

    def neighbours(self, image_id: str, k: int) -> list[dict]:
        """The ``k`` folder images whose class token is most cosine-similar to ``image_id``'s (itself excluded)."""
        if not 1 <= k <= self.cfg.max_neighbours:
            raise ApiError(400, f"k must be between 1 and {self.cfg.max_neighbours}, got {k}")
        with self._lock:
            query = self.features(image_id).cls
            ids, keys = self._folder_class_tokens()
        pairs = [(i, s) for i, s in zip(ids, cosine_to_all(query, keys).tolist() if ids else []) if i != image_id]
        pairs.sort(key=lambda p: -p[1])
        return [{"id": i, "score": round(s, 4)} for i, s in pairs[:k]]


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of an image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` for embedding an image in JSON."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
