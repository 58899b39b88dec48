"""Linear monocular depth on frozen tokens: the paper's lin.1 / lin.4 probes.

Paper §7.4 and dinov2 ``hub/depthers.py`` + ``hub/depth/decode_heads.py`` (``BNHead`` with
``classify=True``):

* tokens: ``get_intermediate_layers(..., return_class_token=True, norm=False)`` (no final
  LayerNorm) of the last block (lin.1) or of 4 blocks (lin.4: {3, 6, 9, 12} of 12 blocks,
  {5, 12, 18, 24} of 24, {10, 20, 30, 40} of 40, 1-based); the class token is concatenated to
  every patch token, blocks are concatenated: [h, w, L * 2D].
* head (1x1 conv to 256 bins, x4 bilinear), bins, "linear normalisation", silog loss: see
  :mod:`dinolab.eval.depth_head`. ``loss="ce"`` instead trains the bins as a plain classification of
  the bin nearest to the true depth, on the x4 logit grid (ground truth sampled there by nearest neighbour).
* depth range per dataset: (0.001, 10) m indoors (NYU / SUN / TUM), (0.001, 80) m on KITTI, as the
  official heads; a ``max_depth`` stored in the data file, or the config's, takes precedence.

Evaluation on pixels with min_depth < gt <= max_depth (no Eigen / Garg crop), metrics per image
then averaged: RMSE (m), AbsRel = mean |pred - gt| / gt, delta1 = share of pixels with
max(pred/gt, gt/pred) < 1.25 (0..1), log10 = mean |log10 pred - log10 gt|.

Data without a train split (``shared/data/depth_samples``: 5 indoor + 3 KITTI frames) is evaluated
leave-one-out within each group: a head is trained on the other frames and tested on the held-out
one. With so few frames this checks the plumbing, it is not a benchmark.

Input size: whole images resized so that the shorter side is ``short_side`` (default 12 patches,
168 for p14: NYU 240x320 -> 168x224, KITTI 187x621 -> 168x560), or exactly ``image_size``.

Metric names: ``depth/{group}/{rmse,abs_rel,delta1,log10}`` (``depth/...`` for a train/test file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dinolab.eval.data import DepthData, DepthGroup, DepthSplit
from dinolab.eval.depth_head import LinearDepthHead, bin_centers, depth_to_bin, silog_loss
from dinolab.eval.features import dense_preprocess, keeps_global_rng
from dinolab.features.cache import FeatureConfig, extract
from dinolab.features.embed import FeatureSpec

# max depth (m) by a name fragment of the dataset / group, as the official depth heads
DEPTH_RANGES = {"kitti": 80.0, "nyu": 10.0, "indoor": 10.0, "sun": 10.0, "tum": 10.0}
LIN4_BLOCKS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}  # 0-based, dinov2 depthers


@dataclass
class DepthConfig:
    """Linear-depth settings.

    Attributes:
        head: "lin1" or "lin4".
        n_bins, min_depth: bins over [min_depth, max_depth].
        max_depth: None: the data file's, else :data:`DEPTH_RANGES` by group / file name, else the
            largest ground-truth depth of the group.
        normalisation: "linear" (AdaBins / official) or "softmax".
        loss: "silog" (official) or "ce".
        upsample: logits upsampling factor (official 4).
        image_size, short_side: input size (see module docstring).
        iterations, batch_size, lr, weight_decay: AdamW with cosine decay.
    """

    head: str = "lin1"
    n_bins: int = 256
    min_depth: float = 1e-3
    max_depth: float | None = None
    normalisation: str = "linear"
    loss: str = "silog"
    upsample: int = 4
    image_size: tuple[int, int] | None = None
    short_side: int | None = None
    iterations: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    progress: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        for name, value, options in (
            ("head", self.head, ("lin1", "lin4")),
            ("normalisation", self.normalisation, ("linear", "softmax")),
            ("loss", self.loss, ("silog", "ce")),
        ):
            if value not in options:
                raise ValueError(f"depth {name} must be one of {', '.join(options)}, got {value!r}")


# ---------------------------------------------------------------------------------------------- metrics
def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """RMSE, AbsRel, delta1 and log10 of one image's pred / gt [H, W] on ``valid`` pixels."""
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    ratio = np.maximum(p / g, g / p)
    return {
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
    }


# ---------------------------------------------------------------------------------------------- tokens, training
def lin_blocks(head: str, n_blocks: int) -> tuple[int, ...]:
    """0-based block indices of lin.1 (last block) or lin.4 (official table, else evenly spaced)."""
    if head == "lin1":
        return (n_blocks - 1,)
    if n_blocks in LIN4_BLOCKS:
        return LIN4_BLOCKS[n_blocks]
    return tuple(sorted({max(0, round((i + 1) * n_blocks / 4) - 1) for i in range(4)}))


def depth_tokens(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``patch`` [N, L, h, w, D] and ``cls`` [N, L, D] -> [N, h, w, L * 2D] (cls beside each patch)."""
    patch = feats["patch"].float()
    cls = feats["cls"][:, :, None, None, :].expand_as(patch)
    return torch.cat([patch, cls], dim=-1).permute(0, 2, 3, 1, 4).flatten(3)


def train_depth_head(head: LinearDepthHead, tokens: torch.Tensor, depth: torch.Tensor, cfg: DepthConfig) -> None:
    """Fit the head on tokens [N, h, w, Din] against depth maps [N, H, W] (0 = invalid)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.iterations)))
    lo, hi = head.centers[0].item(), head.centers[-1].item()
    for _ in tqdm(range(cfg.iterations), desc="depth head", disable=not cfg.progress, leave=False):
        idx = torch.randint(len(tokens), (min(cfg.batch_size, len(tokens)),), generator=gen)
        gt = depth[idx]
        valid = (gt > lo) & (gt <= hi)
        if cfg.loss == "silog":
            loss = silog_loss(head(tokens[idx], gt.shape[-2:]), gt, valid)
        else:  # classification at the upsampled logit grid, against the nearest ground-truth pixel
            logits = head.logits(tokens[idx])  # [B, H', W', K]
            gt_small = F.interpolate(gt[:, None], size=logits.shape[1:3], mode="nearest")[:, 0]
            valid_small = (gt_small > lo) & (gt_small <= hi)
            target = depth_to_bin(gt_small, head.centers).masked_fill(~valid_small, -100)
            loss = F.cross_entropy(logits.permute(0, 3, 1, 2), target, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


# ---------------------------------------------------------------------------------------------- run
def group_max_depth(group: DepthGroup, data: DepthData, cfg: DepthConfig) -> float:
    """Depth range of a group (see :class:`DepthConfig`)."""
    if cfg.max_depth is not None:
        return cfg.max_depth
    if data.max_depth is not None:
        return data.max_depth
    name = f"{group.name} {data.source}".lower()
    for fragment, value in DEPTH_RANGES.items():
        if fragment in name:
            return value
    splits = [s for s in (group.train, group.test) if s is not None]
    return float(math.ceil(max(s.depth.max() for s in splits)))


def _tokens(model: nn.Module, split: DepthSplit, cfg: DepthConfig, desc: str) -> torch.Tensor:
    spec = FeatureSpec(layers=lin_blocks(cfg.head, model.n_blocks), norm=False, patch="all")
    pre = dense_preprocess(split.images.native_size, model.patch_size, cfg.image_size, cfg.short_side)
    return depth_tokens(extract(model, split.images, pre, spec, cfg.features, desc))


@keeps_global_rng
def _fit_predict(
    train_x: torch.Tensor, train_d: torch.Tensor, test_x: torch.Tensor, out_size: tuple[int, int],
    centers: torch.Tensor, cfg: DepthConfig,
) -> np.ndarray:
    torch.manual_seed(cfg.seed)
    head = LinearDepthHead(train_x.shape[-1], centers, cfg.upsample, cfg.normalisation)
    train_depth_head(head, train_x, train_d, cfg)
    with torch.no_grad():
        return head(test_x, out_size).numpy()


def evaluate_group(model: nn.Module, group: DepthGroup, data: DepthData, cfg: DepthConfig, artifacts: dict | None):
    """Per-image metrics averaged over the group's test images (leave-one-out without a train split)."""
    max_depth = group_max_depth(group, data, cfg)
    centers = bin_centers(cfg.min_depth, max_depth, cfg.n_bins)
    test_x = _tokens(model, group.test, cfg, f"depth {group.name}")
    test_d = torch.from_numpy(group.test.depth)
    if group.train is not None:
        train_x = _tokens(model, group.train, cfg, f"depth {group.name} train")
        train_d = torch.from_numpy(group.train.depth)
        preds = _fit_predict(train_x, train_d, test_x, test_d.shape[-2:], centers, cfg)
    else:
        if len(test_x) < 2:
            raise ValueError(f"{data.source}: depth group {group.name!r} needs >= 2 images for leave-one-out")
        preds = np.concatenate([
            _fit_predict(torch.cat([test_x[:i], test_x[i + 1 :]]), torch.cat([test_d[:i], test_d[i + 1 :]]),
                         test_x[i : i + 1], test_d.shape[-2:], centers, cfg)
            for i in range(len(test_x))
        ])
    per_image = []
    for pred, gt in zip(preds, group.test.depth):
        valid = (gt > cfg.min_depth) & (gt <= max_depth)
        per_image.append(depth_metrics(pred, gt, valid))
    if artifacts is not None:
        artifacts.setdefault("depth_samples", []).append(
            (f"{group.name} (max {max_depth:g} m)", group.test.images[0], group.test.depth[0], preds[0])
        )
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}, max_depth


def run(
    model: nn.Module, data: DepthData, cfg: DepthConfig = DepthConfig(), artifacts: dict | None = None
) -> dict[str, float]:
    """lin.1 / lin.4 depth metrics for every group of ``data``."""
    metrics = {}
    for name, group in data.groups.items():
        group_metrics, max_depth = evaluate_group(model, group, data, cfg, artifacts)
        prefix = "depth" if name == "default" else f"depth/{name}"
        metrics.update({f"{prefix}/{k}": v for k, v in group_metrics.items()})
        metrics[f"{prefix}/max_depth"] = max_depth
    return metrics
