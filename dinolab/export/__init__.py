"""Backbone export (ONNX, ``torch.export``, safetensors) with a parity check against eager PyTorch.

Library: :func:`export_backbone` writes the file and returns the parity figures; :class:`ExportModule`
is the traced graph. CLI: ``dinolab export --weights W --format onnx --out model.onnx``.

Outputs carry the official ``forward_features`` names: ``x_norm_clstoken`` [B, D]; with
``patch_tokens`` also ``x_norm_patchtokens`` [B, N, D] and (models with registers) ``x_norm_regtokens``
[B, R, D]. ONNX and ``torch.export`` graphs take any batch and any height/width that are multiples
of the patch size (``dynamic=True``, the default): the position embeddings are interpolated inside the
graph with the official rules (see :mod:`dinolab.export.graph`).

Modules: ``graph`` (the exported module, in-graph position embeddings), ``writers`` (one writer per format,
:func:`load_runner`), ``check`` (:func:`export_backbone`, :func:`parity`, check images), ``cli``.
"""

from dinolab.export.check import (DEFAULT_TOLERANCE, ExportResult, check_request, export_backbone,
                                  load_check_images, parity, synthetic_images)
from dinolab.export.graph import ExportModule, bicubic_matrix, interpolated_pos_embed, reference_outputs
from dinolab.export.writers import (DTYPES, EXTRA_HINT, FORMATS, ONNX_OPSET, Runner, load_runner, write_onnx,
                                    write_safetensors, write_torch_export)

__all__ = [
    "DEFAULT_TOLERANCE", "DTYPES", "EXTRA_HINT", "FORMATS", "ONNX_OPSET", "ExportModule", "ExportResult", "Runner",
    "bicubic_matrix", "check_request", "export_backbone", "interpolated_pos_embed", "load_check_images",
    "load_runner", "parity", "reference_outputs", "synthetic_images", "write_onnx", "write_safetensors",
    "write_torch_export",
]
