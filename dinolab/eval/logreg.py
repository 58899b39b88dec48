"""Logistic regression on frozen class tokens (the paper's fine-grained transfer protocol).

dinov2 ``eval/log_regression.py`` (RECIPE §2.10): multinomial L2-regularised logistic regression
fitted by L-BFGS on float64 class tokens (the backbone output, no extra normalisation),
``max_iter`` 1000, for C in ``10 ** linspace(-6, 5, 45)``. C is chosen on the validation split
(or, when there is none, on a seeded 10% of the training set), then the final model is refitted on
train + validation with that C and evaluated on the test split.

The official code uses cuML; here the objective is minimised with ``torch.optim.LBFGS`` (strong
Wolfe line search), so it runs on the GPU when the features are there and on the CPU otherwise.
The objective is scikit-learn's ``C * sum_i CE_i + ||W||^2 / 2`` divided by ``C * N`` (same
minimiser, better scaled); the bias is not penalised. Along the C grid each fit starts from the
previous solution (warm start), which changes nothing but the time.

Metric names: ``logreg/test/top1``, ``logreg/test/top5`` (``val`` instead of ``test`` when the data
has no test split), ``logreg/selection/top1`` (on the split used to choose C) and ``logreg/best/C``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dinolab.eval.data import ClassificationData
from dinolab.eval.features import classification_preprocess, global_spec
from dinolab.features.cache import FeatureConfig, extract
from dinolab.utils.runtime import resolve_device
from dinolab.data.splits import split_holdout
from dinolab.eval.metrics import confusion_matrix, topk_accuracy


@dataclass
class LogRegConfig:
    """Logistic-regression settings (defaults: dinov2).

    Attributes:
        c_log10_min, c_log10_max, n_c: the C grid ``10 ** linspace(min, max, n_c)``.
        max_iter: L-BFGS iterations per fit.
        tol: stop when every gradient entry of the scaled objective is below this.
        val_fraction: held-out share of train used to choose C when there is no val split.
        device: "auto" (CUDA when available), "cpu", "cuda" ...
    """

    c_log10_min: float = -6.0
    c_log10_max: float = 5.0
    n_c: int = 45
    max_iter: int = 1000
    tol: float = 1e-9
    val_fraction: float = 0.1
    device: str = "auto"
    image_size: int | None = None
    seed: int = 0
    progress: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)

    @property
    def c_values(self) -> list[float]:
        return (10.0 ** np.linspace(self.c_log10_min, self.c_log10_max, self.n_c)).tolist()


@dataclass
class LogisticModel:
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, C]."""
        return x.to(self.weight) @ self.weight + self.bias


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    C: float,
    max_iter: int = 1000,
    tol: float = 1e-9,
    init: LogisticModel | None = None,
) -> LogisticModel:
    """Minimise ``mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C N)`` with L-BFGS.

    Args:
        x: [N, D] (float64 recommended); y: [N] int.
        init: warm start.
    """
    n, d = x.shape
    w = (init.weight.clone() if init else torch.zeros(d, num_classes, dtype=x.dtype, device=x.device)).requires_grad_()
    b = (init.bias.clone() if init else torch.zeros(num_classes, dtype=x.dtype, device=x.device)).requires_grad_()
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0, history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + w.square().sum() / (2 * C * n)
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(w.detach(), b.detach())


def sweep_c(
    train_x: torch.Tensor, train_y: torch.Tensor, sel_x: torch.Tensor, sel_y: torch.Tensor, num_classes: int,
    cfg: LogRegConfig,
) -> tuple[float, float]:
    """(best C, its selection top-1) over the grid, fitting from small to large C with warm starts."""
    best_c, best_acc, model = cfg.c_values[0], -1.0, None
    for c in tqdm(cfg.c_values, desc="logreg C sweep", disable=not cfg.progress, leave=False):
        model = fit_logistic_regression(train_x, train_y, num_classes, c, cfg.max_iter, cfg.tol, init=model)
        acc = topk_accuracy(model.logits(sel_x), sel_y, 1)
        if acc > best_acc:  # strict: ties keep the smaller C (stronger regularisation)
            best_c, best_acc = c, acc
    return best_c, best_acc


def logreg_from_features(
    train: tuple[torch.Tensor, torch.Tensor],
    selection: tuple[torch.Tensor, torch.Tensor],
    report: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    cfg: LogRegConfig,
    report_name: str = "test",
    artifacts: dict | None = None,
) -> dict[str, float]:
    """Choose C on ``selection``, refit on train + selection, evaluate on ``report``.

    Each argument is (features [N, D], labels [N]).
    """
    device = resolve_device(cfg.device)
    tx, ty = train[0].to(device, torch.float64), train[1].to(device)
    sx, sy = selection[0].to(device, torch.float64), selection[1].to(device)
    best_c, sel_acc = sweep_c(tx, ty, sx, sy, num_classes, cfg)
    all_x, all_y = torch.cat([tx, sx]), torch.cat([ty, sy])
    final = fit_logistic_regression(all_x, all_y, num_classes, best_c, cfg.max_iter, cfg.tol)
    logits = final.logits(report[0].to(device, torch.float64)).cpu()
    if artifacts is not None:
        artifacts["confusion"] = confusion_matrix(logits.argmax(1), report[1], num_classes).numpy()
        artifacts["confusion_title"] = f"logistic regression confusion matrix (C={best_c:.3g})"
    return {
        f"logreg/{report_name}/top1": topk_accuracy(logits, report[1], 1),
        f"logreg/{report_name}/top5": topk_accuracy(logits, report[1], 5),
        "logreg/selection/top1": sel_acc,
        "logreg/best/C": best_c,
    }


def run(
    model: nn.Module, data: ClassificationData, cfg: LogRegConfig = LogRegConfig(), artifacts: dict | None = None
) -> dict[str, float]:
    """Logistic-regression accuracy of ``model``'s class tokens (see module docstring)."""
    train = data.split("train")
    pre = classification_preprocess(train.images.native_size, model.patch_size, cfg.image_size)

    def tokens(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = data.split(split)
        cls = extract(model, s.images, pre, global_spec(model), cfg.features, f"logreg {split}")["cls"][:, -1]
        return cls, torch.from_numpy(s.labels)

    train_xy = tokens("train")
    if "val" in data.splits and "test" in data.splits:
        selection, report, report_name = tokens("val"), tokens("test"), "test"
    else:
        report_name = data.eval_split
        report = tokens(report_name)
        keep, held = (torch.from_numpy(i) for i in split_holdout(len(train_xy[1]), cfg.val_fraction, cfg.seed))
        train_xy, selection = (train_xy[0][keep], train_xy[1][keep]), (train_xy[0][held], train_xy[1][held])
    if artifacts is not None:
        artifacts["class_names"] = data.class_names
    return logreg_from_features(train_xy, selection, report, data.num_classes, cfg, report_name, artifacts)
