"""Writing an :class:`~dinolab.export.graph.ExportModule` as ONNX, ``torch.export`` (.pt2) or safetensors, and
:func:`load_runner`: running the written file in its own runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dinolab.export.graph import ExportModule, reference_outputs

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_OPSET = 18
EXTRA_HINT = 'pip install "dinolab[export]" (onnx, onnxruntime, onnxscript)'


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)}: {EXTRA_HINT}")


def _dynamic_shapes(patch: int, sizes: bool) -> dict:
    """Symbolic batch always (the example has 2 images, so it is not specialised to 1); height and width
    as ``patch * n`` when ``sizes``."""
    from torch.export import Dim

    batch, gh, gw = Dim("batch", min=1, max=4096), Dim("gh", min=1, max=512), Dim("gw", min=1, max=512)
    return {"x": {0: batch, 2: patch * gh, 3: patch * gw} if sizes else {0: batch}}


def write_torch_export(module: ExportModule, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    """``torch.export.export`` (batch symbolic; height and width too when ``dynamic``), ``torch.export.save``."""
    from dinolab.utils.io import atomic_path

    shapes = _dynamic_shapes(module.backbone.patch_size, dynamic)
    program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: save() wants a .pt2 name otherwise
        torch.export.save(program, f)


def write_onnx(module: ExportModule, example: torch.Tensor, path: Path, dynamic: bool,
               log: Callable[[str], None] = print) -> str:
    """``torch.onnx.export(dynamo=True)``, else the legacy TorchScript exporter; returns which one ran.

    One self-contained file, except for weights over 1.5 GiB (protobuf's 2 GiB limit), which go to
    ``<path>.data`` beside it. Both are written in a temporary folder and moved into place at the end.
    """
    import logging
    import os
    import tempfile
    import warnings

    names = dict(input_names=["x"], output_names=module.output_names, opset_version=ONNX_OPSET)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5 * 2**30
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" lines
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(folder) / path.name  # the final name: an external-data file refers to it
        try:
            shapes = _dynamic_shapes(module.backbone.patch_size, dynamic)
            torch.onnx.export(module, (example,), str(tmp), dynamo=True, dynamic_shapes=shapes, verbose=False,
                              external_data=external, **names)
            how = "dynamo"
        except Exception as err:  # noqa: BLE001 - any exporter failure: try the other one, say why in one line
            log(f"torch.onnx dynamo exporter failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                "trying the legacy exporter")
            for f in Path(folder).iterdir():
                f.unlink()
            axes = {"x": {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}}
            axes.update({k: {0: "batch"} for k in module.output_names})
            if dynamic and "x_norm_patchtokens" in axes:
                axes["x_norm_patchtokens"][1] = "patches"
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, dynamic_axes=axes, **names)
            how = "legacy"
        for f in sorted(Path(folder).iterdir(), key=lambda f: f == tmp):  # the .onnx last: never without its data
            os.replace(f, path.parent / f.name)
    return how


def write_safetensors(backbone: nn.Module, path: Path) -> None:
    """Backbone weights (official keys, in the backbone's dtype) with its constructor arguments."""
    from dinolab.models.checkpoints import save_backbone

    save_backbone(backbone, path)


Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def load_runner(path: str | Path, fmt: str, output_names: list[str], dtype: str = "fp32") -> Runner:
    """A callable x [B, 3, H, W] -> {output name: tensor} that runs the written file in its own runtime:
    onnxruntime (CPU) for ONNX, ``torch.export.load(...).module()`` for ``.pt2``, a rebuilt backbone
    (``build_backbone("auto", weights=path)``) for safetensors."""
    path, torch_dtype = Path(path), DTYPES[dtype]
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        np_dtype = np.float16 if dtype == "fp16" else np.float32

        def run_onnx(x: torch.Tensor) -> dict[str, torch.Tensor]:
            outs = session.run(output_names, {"x": x.numpy().astype(np_dtype)})
            return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(output_names, outs)}

        return run_onnx
    if fmt == "torch-export":
        module = torch.export.load(str(path)).module()

        def run_program(x: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                return dict(zip(output_names, module(x.to(torch_dtype))))

        return run_program
    from dinolab.models import build_backbone

    backbone = build_backbone("auto", weights=path).to(torch_dtype).eval()
    return lambda x: reference_outputs(backbone, x.to(torch_dtype), output_names)

