"""Frozen-feature evaluation: one module per protocol, each a dataclass config and ``run(...) -> dict``.

============== ====================================================================
knn            weighted k-NN on class tokens (DINO protocol)
linear         grid of linear probes on cached features (dinov2 ``eval/linear.py``)
logreg         L-BFGS logistic regression, C chosen on validation
retrieval      cosine ranking, mAP, Revisited Oxford/Paris easy/medium/hard
segmentation   (BN +) linear head on patch tokens, mIoU
depth          lin.1 / lin.4 heads, 256 bins with linear normalisation
features       extraction with an on-disk cache; default input sizes
data           input formats and their checks
report         results JSON + Markdown report with pictures
cli            ``dinolab eval PROTOCOL ...``
============== ====================================================================

Nothing is imported here, so ``import dinolab.eval.knn`` does not pull in matplotlib or sklearn.
"""
