import numpy as np
import torch

from dinolab.configs import load_config
from dinolab.data.collate import collate_crops
from dinolab.data.masking import MaskingGenerator
from dinolab.train.build import build_optimizer, schedule_config
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.schedules import schedule_values
from dinolab.train.step import train_step
from tiny_run import TINY_RUN


def _setup():
    cfg = load_config("cpu", [*TINY_RUN, "optim.epochs=2"])
    torch.manual_seed(0)
    meta = SSLMetaArch.from_config(cfg)
    g, l, n = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.global_crops_size // cfg.student.patch_size
    samples = [{"global_crops": [torch.randn(3, g, g) for _ in range(2)],
                "local_crops": [torch.randn(3, l, l) for _ in range(cfg.crops.local_crops_number)]} for _ in range(4)]
    batch = collate_crops(samples, mask_generator=MaskingGenerator((n, n), max_num_patches=0.5 * n * n), n_tokens=n * n,
                          rng=np.random.default_rng(0))
    return meta, build_optimizer(meta, cfg), batch, schedule_values(schedule_config(cfg, 4), 2)  # lr > 0 (warm-up starts at 0)


def test_gradients_are_freed_after_the_step_unless_kept():
    meta, optimizer, batch, sched = _setup()
    before = [p.detach().clone() for p in meta.student.parameters()]
    train_step(meta, optimizer, batch, sched, 0)
    assert all(p.grad is None for p in meta.student.parameters())  # the next forward does not hold them
    assert any(not torch.equal(a, p) for a, p in zip(before, meta.student.parameters()))  # yet the step happened
    train_step(meta, optimizer, batch, sched, 1, keep_grads=True)
    trained = [p for p in meta.student.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)
