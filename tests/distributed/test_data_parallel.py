"""Two CPU ranks (gloo) train exactly as one process on the same global batch; DCP checkpoints move between them.

Batch split: rank r takes images [r*B/2, (r+1)*B/2) of one global batch of B images (each of their crops
and masks), so the union of the ranks' data is the 1-process batch. What is exact, and why:
  * DINO and iBOT losses are means over images: the mean over ranks of per-rank means is the global mean
    (iBOT divides by each rank's 2*B/2 global crops), and FSDP/DDP average gradients over ranks;
  * Sinkhorn-Knopp all-reduces its sums, so each rank's targets are the rows of the global targets;
  * KoLeo is per rank, as in the official code (nearest neighbours among the rank's own images): the
    1-process reference therefore computes KoLeo on each half and averages the two (``PerHalfKoleo``).
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks

from dinolab.configs import load_config
from dinolab.distributed.checkpoint import load_dcp, load_full_state, save_dcp
from dinolab.distributed.env import init_distributed, mean_over_ranks, shutdown
from dinolab.distributed.fsdp import parallelize
from dinolab.losses import koleo_loss
from dinolab.train.build import build_optimizer, schedule_config
from dinolab.train.meta_arch import SSLMetaArch, _nonfinite_everywhere
from dinolab.train.schedules import schedule_values
from dinolab.train.step import train_step

KOLEO = 0.1
OVERRIDES = [
    "student.embed_dim=32", "student.num_heads=2", "student.depth=2", "student.drop_path_rate=0",
    "dino.head.n_prototypes=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
    "ibot.head.n_prototypes=48", "ibot.head.hidden_dim=32", "ibot.head.bottleneck_dim=16",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "train.precision=fp32", "optim.epoch_length=4", "optim.epochs=2", "optim.warmup_epochs=1",
    "optim.clip_grad=0.05", "optim.base_lr=1e-2",  # steps 2-3 clip (norms are ~100): FSDP clips sharded grads
    f"dino.koleo_loss_weight={KOLEO}",
]
B, N = 8, 16  # images per global batch, patches per global crop (16 / 4)


def make_cfg(koleo: float = KOLEO):
    return load_config("cpu", [*OVERRIDES, f"dino.koleo_loss_weight={koleo}"])


def global_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * B, N, generator=g) < 0.3
    masks[::2] = False  # half of the global crops unmasked, as the collate does
    return {
        "global_crops": torch.randn(2 * B, 3, 16, 16, generator=g),
        "local_crops": torch.randn(2 * B, 3, 8, 8, generator=g),
        "masks": masks,
    }


def with_mask_fields(batch: dict) -> dict:
    masks = batch["masks"]
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {**batch, "mask_indices": masks.flatten().nonzero().flatten(), "masks_weight": weight}


def rank_part(batch: dict, rank: int, world: int) -> dict:
    """Images [rank*B/world, (rank+1)*B/world) of a crop-major batch: all their crops and masks."""
    n = B // world
    images = torch.arange(rank * n, (rank + 1) * n)
    g_idx = torch.cat([c * B + images for c in range(2)])
    l_idx = torch.cat([c * B + images for c in range(batch["local_crops"].shape[0] // B)])
    part = {"global_crops": batch["global_crops"][g_idx], "local_crops": batch["local_crops"][l_idx],
            "masks": batch["masks"][g_idx]}
    return with_mask_fields(part)


class PerHalfKoleo(SSLMetaArch):
    """1-process reference for 2 ranks: KoLeo on each rank's images, averaged over the two ranks."""

    def compute_losses(self, student, targets, batch):
        losses = super().compute_losses(student, targets, batch)  # built with KoLeo weight 0
        cls = student["global_cls"]  # [2B, D], crop-major
        halves = [torch.cat([cls[:B][idx], cls[B:][idx]]) for idx in torch.arange(B).chunk(2)]
        koleo = sum(KOLEO * sum(koleo_loss(x) for x in h.chunk(2)) for h in halves) / 2
        total = losses.pop("total") + koleo
        return {**losses, "koleo": koleo, "total": total}


def steps(meta, optimizer, cfg, batches, start: int = 0, clip: bool = True) -> list[dict]:
    """``train_step`` on each batch; ``clip=False`` keeps the raw (rank-averaged) gradients to compare."""
    sched_cfg = schedule_config(cfg, B)
    clip_grad = cfg.optim.clip_grad if clip else 0.0
    return [train_step(meta, optimizer, b, schedule_values(sched_cfg, i), i, "fp32", clip_grad, keep_grads=True)
            for i, b in enumerate(batches, start=start)]


def full_grads(meta) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in meta.student.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.replace("module.", "")] = g.detach().clone()
    return out


def full_params(meta) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(meta, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def built(mode: str, precision: str = "fp32", seed: int = 0):
    """(meta, optimizer, cfg) of the test config, parallelised over the ranks."""
    torch.manual_seed(seed)
    cfg = make_cfg()
    meta = SSLMetaArch.from_config(cfg)
    parallelize(meta, mode, torch.device("cpu"), precision)
    return meta, build_optimizer(meta, cfg), cfg


def later_losses(meta, optimizer, cfg, rank: int) -> list[dict]:
    """Global-batch losses of steps 2 and 3 (iterations 1, 2)."""
    later = steps(meta, optimizer, cfg, [rank_part(global_batch(s), rank, 2) for s in (2, 3)], start=1)
    return [mean_over_ranks(x) for x in later]


def trained_records(rank: int, out_dir: str) -> dict:
    """Per mode: first-step losses, raw gradients and parameters after it, later losses; FSDP saves a DCP."""
    from torch.distributed.tensor import DTensor

    results = {}
    for mode in ("fsdp", "ddp"):
        meta, optimizer, cfg = built(mode)
        first = steps(meta, optimizer, cfg, [rank_part(global_batch(1), rank, 2)], clip=False)
        record = {"loss1": mean_over_ranks(first[0]), "grads": full_grads(meta), "params": full_params(meta),
                  "teacher_sharded": all(isinstance(p, DTensor) for p in meta.teacher.parameters())}
        if mode == "fsdp":
            save_dcp(f"{out_dir}/dcp", meta, optimizer, {"iteration": 1})
        record["later"] = later_losses(meta, optimizer, cfg, rank)
        results[mode] = record
    return results


def continued_records(rank: int, out_dir: str) -> dict:
    """Later losses on 2 ranks after loading the 1-process file or the FSDP ranks' DCP directory."""
    results = {}
    for mode in ("fsdp", "ddp"):
        for source in ("file", "dcp"):
            meta, optimizer, cfg = built(mode, seed=1)  # other initial weights: the loaded ones must replace them
            if source == "file":
                single = torch.load(f"{out_dir}/single.pth", weights_only=True)
                load_full_state(meta, optimizer, single["model"], single["optimizer"])
            else:
                load_dcp(f"{out_dir}/dcp", meta, optimizer)
            results[f"{mode}_from_{source}"] = later_losses(meta, optimizer, cfg, rank)
    return results


def two_rank_worker(rank: int, out_dir: str) -> None:
    env = init_distributed()
    results = {**trained_records(rank, out_dir), **continued_records(rank, out_dir)}
    nan_on_rank_1 = {"dino": torch.tensor(float("nan") if rank == 1 else 1.0), "total": torch.tensor(2.0)}
    results["nonfinite_seen"] = [bool(v.isnan()) for v in _nonfinite_everywhere(nan_on_rank_1).values()]
    # bf16: FSDP gathers bf16 parameters, reduces backbone gradients in bf16 and the heads' in fp32
    meta, optimizer, cfg = built("fsdp", "bf16")
    sched = schedule_values(schedule_config(cfg, B), 0)
    bf16 = train_step(meta, optimizer, rank_part(global_batch(1), rank, 2), sched, 0, "bf16", 0.0)
    results["fsdp_bf16_loss1"] = mean_over_ranks(bf16)
    if rank == 0:
        torch.save(results, f"{out_dir}/two_ranks.pt")
    shutdown(env, synchronize=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    meta, optimizer, cfg = reference()
    steps(meta, optimizer, cfg, [with_mask_fields(global_batch(1))], clip=False)
    torch.save({"model": meta.state_dict(), "optimizer": optimizer.state_dict()}, out / "single.pth")
    run_ranks(two_rank_worker, 2, str(out))
    return out, torch.load(out / "two_ranks.pt", weights_only=True)


def reference():
    """One process, the whole batch: (meta, optimizer, cfg); the same initial weights as the ranks'."""
    torch.manual_seed(0)
    cfg = make_cfg(koleo=0.0)  # PerHalfKoleo adds KoLeo itself
    meta = PerHalfKoleo.from_config(cfg)
    return meta, build_optimizer(meta, cfg), cfg


def close(a, b):
    # gradients reach ~1e3 here: two ranks sum in another order than one process, and fp32 keeps ~7
    # digits, so single elements differ by up to ~2e-5 relative (losses are compared at 1e-5 above)
    torch.testing.assert_close(a, b, rtol=5e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_equal_one_process_on_the_same_global_batch(two_ranks, mode):
    _, results = two_ranks
    got = results[mode]
    meta, optimizer, cfg = reference()
    first = steps(meta, optimizer, cfg, [with_mask_fields(global_batch(1))], clip=False)[0]
    assert set(got["loss1"]) == set(first) == {"dino", "ibot", "koleo", "total"}
    for term, value in first.items():
        assert got["loss1"][term] == pytest.approx(value, rel=1e-5, abs=1e-6), term
    grads = {n: p.grad for n, p in meta.student.named_parameters()}
    assert sorted(got["grads"]) == sorted(grads)
    for name, g in grads.items():
        close(got["grads"][name], g)
    params = meta.state_dict()
    for name, value in params.items():  # student after AdamW, teacher after the EMA
        close(got["params"][name], value)
    later = steps(meta, optimizer, cfg, [with_mask_fields(global_batch(s)) for s in (2, 3)], start=1)
    for got_step, want_step in zip(got["later"], later):
        assert got_step["total"] == pytest.approx(want_step["total"], rel=1e-5)


def test_fsdp_teacher_stays_sharded_after_its_forward(two_ranks):
    # the EMA reads local shards: a teacher root left unsharded after a no-grad forward would break it
    assert two_ranks[1]["fsdp"]["teacher_sharded"]


def test_dcp_checkpoint_saved_on_two_ranks_resumes_on_one(two_ranks):
    out, results = two_ranks
    meta, optimizer, cfg = reference()
    state = load_dcp(out / "dcp", meta, optimizer)  # no process group: one rank reads every shard
    assert state == {"iteration": 1}
    later = steps(meta, optimizer, cfg, [with_mask_fields(global_batch(s)) for s in (2, 3)], start=1)
    for got, want in zip(later, results["fsdp"]["later"]):  # the second loss needs the restored Adam moments
        assert got["total"] == pytest.approx(want["total"], rel=1e-5)


def test_fsdp_bf16_mixed_precision_runs_on_gloo_close_to_fp32(two_ranks):
    got, want = two_ranks[1]["fsdp_bf16_loss1"], two_ranks[1]["fsdp"]["loss1"]
    for term in want:
        assert got[term] == pytest.approx(want[term], rel=2e-2), term  # bf16: ~3 significant digits


@pytest.mark.parametrize("source", ["file", "dcp"])
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_checkpoints_continue_on_two_ranks(two_ranks, mode, source):
    # file: a 1-process checkpoint; dcp: the directory the FSDP ranks wrote (loaded under FSDP or DDP)
    results = two_ranks[1]
    for got, want in zip(results[f"{mode}_from_{source}"], results["fsdp"]["later"]):
        assert got["total"] == pytest.approx(want["total"], rel=1e-5)


def test_a_nonfinite_loss_on_one_rank_is_seen_by_every_rank(two_ranks):
    # so that every rank raises at the same iteration instead of one waiting forever in a collective
    assert two_ranks[1]["nonfinite_seen"] == [True, False]  # rank 0's view of rank 1's NaN 'dino'
