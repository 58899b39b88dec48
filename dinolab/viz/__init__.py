"""Looking at features: PCA maps, patch matching, attention maps, and a local feature explorer.

Modules: :mod:`~dinolab.viz.pca` (paper Fig. 1/9), :mod:`~dinolab.viz.matching` (Fig. 10),
:mod:`~dinolab.viz.attention` (class-token attention per head, registers handled),
:mod:`~dinolab.viz.explorer` + :mod:`~dinolab.viz.serve` (``dinolab serve``), :mod:`~dinolab.viz.cli`.
Shared plumbing: :mod:`~dinolab.viz.patches` (image -> patch grid features), :mod:`~dinolab.viz.figure`.
"""
