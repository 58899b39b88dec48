"""Feature files: what :func:`dinolab.features.files.extract_features` returns, written as ``.npz`` or
``.safetensors`` and read back without pickle.

Arrays (``cls_tokens``, ``patch_tokens``) are stored as they are; the readable ``paths``, the ``skipped``
files and ``meta`` (model and settings) go to string arrays (``.npz``) or the JSON metadata header
(``.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dinolab.utils.io import atomic_path, atomic_save_npz

OUTPUT_SUFFIXES = (".npz", ".safetensors")  # what save_features writes (case-sensitive)


def save_features(features: dict, path: str | Path, meta: dict | None = None) -> None:
    """Write ``features`` (arrays, ``paths``, ``skipped``) and ``meta`` atomically to ``path``.

    Raises:
        ValueError: ``path`` does not end with ``.npz`` or ``.safetensors``.
    """
    path = Path(path)
    arrays = {k: v for k, v in features.items() if isinstance(v, np.ndarray)}
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output file {path} must end with .npz or .safetensors")
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        header = {"paths": json.dumps(features["paths"]), "skipped": json.dumps(features["skipped"])}
        header["meta"] = json.dumps(meta or {})
        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp), metadata=header)
    else:
        atomic_save_npz(
            path,
            **arrays,
            paths=np.array(features["paths"], dtype=str),
            skipped=np.array(features["skipped"], dtype=str),
            meta=np.array(json.dumps(meta or {})),
        )


def load_features(path: str | Path) -> dict:
    """Read a file written by :func:`save_features`: its arrays, ``paths``, ``skipped`` (lists) and ``meta`` (dict)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata()
        out.update(paths=json.loads(header["paths"]), skipped=json.loads(header["skipped"]))
        out["meta"] = json.loads(header.get("meta", "{}"))
        return out
    with np.load(path, allow_pickle=False) as d:
        out = {k: d[k] for k in d.files}
    out["paths"], out["skipped"] = out["paths"].tolist(), out["skipped"].tolist()
    out["meta"] = json.loads(str(out["meta"]))
    return out
