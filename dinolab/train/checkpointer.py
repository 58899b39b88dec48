"""Run-directory checkpoints: atomic writes, the last K kept, the latest found on resume.

Layout::

    RUN_DIR/
      config.yaml                    the resolved config (written once, checked on resume)
      checkpoints/ckpt_0001250.pth   model + optimizer + sampler + RNG states, last K kept
      metrics.jsonl, tb/, teacher_backbone.{pth,safetensors}, loss_curves.png, summary.json
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dinolab.io import atomic_torch_save

_NAME = re.compile(r"^ckpt_(\d{7,})\.pth$")


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        """Existing checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict, iteration: int) -> Path:
        path = self.dir / f"ckpt_{iteration:07d}.pth"
        atomic_torch_save(state, path)
        for old in self.all()[: -self.keep_last]:
            old.unlink()
        return path

    @staticmethod
    def load(path: str | Path) -> dict:
        """A checkpoint written by :meth:`save` (tensors, numbers, strings: ``weights_only`` safe)."""
        return torch.load(path, map_location="cpu", weights_only=True)
