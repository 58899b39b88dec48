from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from dinolab.eval import logreg
from dinolab.eval.data import load_classification
from dinolab.eval.logreg import LogRegConfig, fit_logistic_regression


def test_lbfgs_fit_matches_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    y = rng.integers(0, 3, 80)
    x[np.arange(80), y] += 1.0  # some signal, not separable
    for C in (0.05, 2.0):
        ours = fit_logistic_regression(torch.from_numpy(x), torch.from_numpy(y), 3, C, max_iter=500, tol=1e-12)
        ref = LogisticRegression(C=C, tol=1e-12, max_iter=5000).fit(x, y)
        probs = ours.logits(torch.from_numpy(x)).softmax(1).numpy()
        np.testing.assert_allclose(probs, ref.predict_proba(x), atol=1e-5)


def test_c_grid_is_the_official_one():
    c = LogRegConfig().c_values
    assert len(c) == 45
    assert np.isclose(c[0], 1e-6) and np.isclose(c[-1], 1e5)


def test_run_on_tiny_model(tiny_model, classification_npz, feature_cfg):
    data = load_classification(classification_npz)
    cfg = LogRegConfig(n_c=4, max_iter=50, image_size=32, val_fraction=0.2, features=feature_cfg, progress=False)
    metrics = logreg.run(tiny_model, data, cfg)
    assert set(metrics) == {"logreg/test/top1", "logreg/test/top5", "logreg/selection/top1", "logreg/best/C"}
    assert metrics["logreg/best/C"] in cfg.c_values
