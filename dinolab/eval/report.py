"""Evaluation outputs: a JSON file with every metric and the exact config, and a Markdown report.

``results.json``::

    {"protocol": "knn",
     "metrics": {"knn/k20/top1": 91.3, ...},        # flat name -> number (names: each protocol's docstring)
     "config": {...},                                # the protocol's dataclass config, as run
     "model": {"arch": ..., "weights": ..., "fingerprint": ...},
     "data": "path", "notes": [...], "seconds": 12.3}

``results.md`` beside it lists the metrics and shows the pictures saved as PNG next to it
(``results_confusion.png``, ``results_segmentation.png``, ``results_depth.png``,
``results_retrieval.png``), drawn from the ``artifacts`` a protocol's ``run`` fills in.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from dinolab.utils.io import atomic_path, atomic_write_json, atomic_write_text


def config_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON-able data (tuples become lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; an undefined metric (e.g. IoU of an absent class) is null
    return obj


def write_results(
    out_json: str | Path,
    protocol: str,
    metrics: dict[str, float],
    config: Any,
    model_info: dict | None = None,
    data: str = "",
    artifacts: dict | None = None,
    seconds: float | None = None,
) -> list[Path]:
    """Write ``out_json``, the Markdown report and its pictures; returns the paths written."""
    out_json = Path(out_json)
    artifacts = artifacts or {}
    notes = list(artifacts.get("notes", []))
    result = {
        "protocol": protocol,
        "metrics": _jsonable(metrics),
        "config": config_dict(config) if dataclasses.is_dataclass(config) else _jsonable(config),
        "model": _jsonable(model_info or {}),
        "data": data,
        "notes": notes,
        "seconds": seconds,
    }
    atomic_write_json(out_json, result)
    written = [out_json]
    figures = save_figures(out_json.with_suffix(""), artifacts)
    written += figures
    md = out_json.with_suffix(".md")
    atomic_write_text(md, markdown_report(result, [f.name for f in figures]))
    return written + [md]


def markdown_report(result: dict, figure_names: list[str]) -> str:
    lines = [f"# dinolab eval {result['protocol']}", ""]
    model = result.get("model") or {}
    if model:
        lines += [f"Model: `{model.get('arch')}` weights `{model.get('weights')}`", ""]
    lines += [f"Data: `{result['data']}`", ""]
    lines += [f"> {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["metrics"].items()]
    lines += [""] + [f"![{name}]({name})" for name in figure_names]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------- figures
def save_figures(stem: Path, artifacts: dict) -> list[Path]:
    """PNG files ``<stem>_<kind>.png`` for every picture the artifacts allow."""
    makers = {
        "confusion": _confusion_figure,
        "segmentation": _segmentation_figure,
        "depth": _depth_figure,
        "retrieval": _retrieval_figure,
    }
    paths = []
    for kind, make in makers.items():
        fig = make(artifacts)
        if fig is None:
            continue
        path = stem.parent / f"{stem.name}_{kind}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        _close(fig)
        paths.append(path)
    return paths


class _Figures:
    """The three pyplot calls this module makes, on plain ``Figure`` objects with the Agg canvas: no global
    backend switch (``matplotlib.use``), no figure registry, safe in a notebook or a server thread."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, figsize=None, squeeze: bool = True):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze)

    @staticmethod
    def close(fig) -> None:  # nothing registered: the figure goes with its last reference
        pass

    @staticmethod
    def get_cmap(name: str):
        from matplotlib import colormaps

        return colormaps[name]


def _pyplot() -> type[_Figures]:
    return _Figures


def _close(fig) -> None:
    _pyplot().close(fig)


def _confusion_figure(artifacts: dict):
    cm = artifacts.get("confusion")
    if cm is None:
        return None
    plt = _pyplot()
    names = artifacts.get("class_names") or []
    if len(names) != len(cm):
        names = [str(i) for i in range(len(cm))]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4, 0.45 * len(cm) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cm)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(cm)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(artifacts.get("confusion_title", "confusion matrix (rows normalised)"), fontsize=9)
    if len(cm) <= 20:
        for i in range(len(cm)):
            for j in range(len(cm)):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    return fig


def label_colours(n: int) -> np.ndarray:
    """[n, 3] uint8 distinct colours (tab20 cycle)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    return (np.array([cmap(i % 20)[:3] for i in range(n)]) * 255).astype(np.uint8)


def colour_mask(mask: np.ndarray, n_classes: int, ignore_index: int) -> np.ndarray:
    """Label map [H, W] -> RGB [H, W, 3]; ignored pixels black."""
    colours = label_colours(n_classes)
    out = colours[np.clip(mask, 0, n_classes - 1)]
    out[(mask == ignore_index) | (mask < 0) | (mask >= n_classes)] = 0
    return out


def overlay(image: np.ndarray, mask: np.ndarray, n_classes: int, ignore_index: int) -> np.ndarray:
    """Half image, half label colour: uint8 [H, W, 3]."""
    return (0.5 * image + 0.5 * colour_mask(mask, n_classes, ignore_index)).astype(np.uint8)


def _segmentation_figure(artifacts: dict):
    samples = artifacts.get("seg_samples")
    if not samples:
        return None
    plt = _pyplot()
    n_cls, ignore = len(artifacts["class_names"]), artifacts.get("ignore_index", 255)
    fig, axes = plt.subplots(len(samples), 3, figsize=(9, 2.6 * len(samples)), squeeze=False)
    for row, (image, gt, pred) in zip(axes, samples):
        pics = (image, overlay(image, gt, n_cls, ignore), overlay(image, pred, n_cls, ignore))
        for ax, pic, title in zip(row, pics, ("image", "ground truth", "prediction")):
            ax.imshow(pic)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return fig


def _depth_figure(artifacts: dict):
    samples = artifacts.get("depth_samples")
    if not samples:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(samples), 3, figsize=(10, 2.8 * len(samples)), squeeze=False)
    for row, (title, image, gt, pred) in zip(axes, samples):
        vmax = float(np.percentile(gt[gt > 0], 99)) if (gt > 0).any() else float(pred.max())
        gt_shown = np.ma.masked_where(gt <= 0, gt)  # invalid pixels blank
        for ax, pic, name in zip(row, (image, gt_shown, pred), ("image", "true depth (m)", "predicted depth (m)")):
            im = ax.imshow(pic, cmap=None if pic is image else "magma_r", vmin=0, vmax=vmax)
            ax.set_title(f"{title}: {name}", fontsize=8)
            ax.axis("off")
            if pic is not image:
                fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _retrieval_figure(artifacts: dict):
    examples = artifacts.get("retrieval_examples")
    if not examples:
        return None
    plt = _pyplot()
    cols = 1 + len(examples[0]["retrieved"])
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.6 * cols, 1.8 * len(examples)), squeeze=False)
    label = {1: "easy +", 2: "hard +", -1: "junk", 0: "neg"}
    for row, ex in zip(axes, examples):
        row[0].imshow(ex["query"])
        row[0].set_title("query", fontsize=7)
        for ax, image, rel in zip(row[1:], ex["retrieved"], ex["relevance"]):
            ax.imshow(image)
            ax.set_title(label[rel], fontsize=7, color="green" if rel > 0 else "grey" if rel < 0 else "red")
        for ax in row:
            ax.axis("off")
    return fig
