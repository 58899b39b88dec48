"""Images -> features, one path for every consumer (extract, eval, the training monitor, curation, viz).

Modules: :mod:`~dinolab.features.inputs` (one ``Preprocess``: resize, centre crop, normalise; ``ModelInputs``),
:mod:`~dinolab.features.embed` (the core: class / patch / register tokens of chosen blocks, batching, bf16,
compile, progress), :mod:`~dinolab.features.cache` (the fingerprinted disk cache of the eval protocols),
:mod:`~dinolab.features.files` (files or in-memory images -> NumPy arrays), :mod:`~dinolab.features.store`
(``.npz`` / ``.safetensors`` feature files), :mod:`~dinolab.features.cli` (``dinolab extract``).
"""
