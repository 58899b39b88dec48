from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinolab.losses import EmaCenter, sinkhorn_knopp, softmax_center


def _official_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """Frozen re-statement of dinov2 DINOLoss.sinkhorn_knopp_teacher, single process (our own code)."""
    q = torch.exp(teacher_output / teacher_temp).t()
    n_samples, n_protos = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


def test_sinkhorn_matches_official_and_rows_are_assignments():
    torch.manual_seed(0)
    logits = torch.randn(24, 10)
    q = sinkhorn_knopp(logits, teacher_temp=0.1)
    torch.testing.assert_close(q, _official_sinkhorn(logits.float(), 0.1), rtol=1e-5, atol=1e-7)
    # the last step normalises samples: each row (sample) sums to exactly 1, the total is B
    torch.testing.assert_close(q.sum(dim=1), torch.ones(24))
    assert q.sum().item() == pytest.approx(24, rel=1e-5)


def test_sinkhorn_columns_converge_to_batch_over_prototypes():
    # each prototype's mass -> B / K as the iterations go (exact only at the fixed point)
    torch.manual_seed(1)
    logits = torch.randn(32, 8)
    for n_iterations, tolerance in ((3, 0.5), (100, 1e-4)):
        q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=n_iterations)
        assert torch.allclose(q.sum(dim=0), torch.full((8,), 32 / 8), rtol=tolerance)
    # without the balancing the columns are far from B/K for the same logits
    plain = torch.softmax(logits / 0.5, dim=-1).sum(dim=0)
    assert not torch.allclose(plain, torch.full((8,), 4.0), rtol=0.05)


def test_sinkhorn_is_shift_invariant_and_does_not_overflow():
    torch.manual_seed(2)
    logits = torch.randn(16, 6)
    q = sinkhorn_knopp(logits, teacher_temp=0.04)
    torch.testing.assert_close(sinkhorn_knopp(logits + 50.0, teacher_temp=0.04), q, rtol=1e-4, atol=1e-6)
    # around 10, official fp32 exp(l / T) overflows (10 / 0.04 = 250 > 88) and returns NaN; the float64
    # official value exists, and ours equals it
    shifted = logits * 0.5 + 10.0
    assert torch.isnan(_official_sinkhorn(shifted, 0.04)).any()
    reference = _official_sinkhorn(shifted.double(), 0.04).float()
    torch.testing.assert_close(sinkhorn_knopp(shifted, teacher_temp=0.04), reference, rtol=1e-4, atol=1e-6)
    # a range no float can hold: zeros for the underflowed entries, never NaN
    assert torch.isfinite(sinkhorn_knopp(logits * 1000.0, teacher_temp=0.04)).all()


def test_sinkhorn_explicit_sample_count_and_half_input():
    torch.manual_seed(3)
    logits = torch.randn(12, 5)
    q = sinkhorn_knopp(logits, 0.1)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, n_samples=12), q)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, n_samples=torch.tensor([12])), q)
    assert sinkhorn_knopp(logits.half(), 0.1).dtype == torch.float32


def test_softmax_center_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0)]])
    torch.testing.assert_close(softmax_center(logits, torch.zeros(1, 2), 1.0), torch.tensor([[1 / 3, 2 / 3]]))
    # subtracting a centre equal to the logits leaves a uniform distribution
    torch.testing.assert_close(softmax_center(logits, logits, 0.04), torch.tensor([[0.5, 0.5]]))


def test_ema_center_momentum_table():
    center = EmaCenter(dim=3, momentum=0.9)
    rows = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])  # mean (1, 1, 1)
    for expected in (0.1, 0.19, 0.271, 0.3439):  # 1 - 0.9^n
        center.update(rows)
        torch.testing.assert_close(center.center, torch.full((1, 3), expected))
    center.update(torch.zeros(0, 3))  # no rows: nothing changes
    torch.testing.assert_close(center.center, torch.full((1, 3), 0.3439))
    assert "center" in center.state_dict()


def test_ema_center_forward_uses_the_centre_before_update():
    center = EmaCenter(dim=2, momentum=0.5)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    probs = center(logits, 1.0)  # centre still 0
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75]]))
    center.update(logits)
    torch.testing.assert_close(center.center, logits * 0.5)


def _two_rank_worker(rank, init_file, out_dir, logits, patch_logits, patch_split):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = logits.shape[0] // 2
        dino_q = sinkhorn_knopp(logits[rank * half : (rank + 1) * half], 0.1)
        patch_slice = slice(0, patch_split) if rank == 0 else slice(patch_split, None)
        ibot_q = sinkhorn_knopp(patch_logits[patch_slice], 0.1)  # unequal per-rank counts, n_samples=None
        center = EmaCenter(dim=logits.shape[1])
        center.update(patch_logits[patch_slice])
        torch.save({"dino": dino_q, "ibot": ibot_q, "center": center.center}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    torch.manual_seed(4)
    logits, patch_logits, patch_split = torch.randn(8, 6), torch.randn(11, 6), 7
    mp.spawn(
        _two_rank_worker,
        args=(str(tmp_path / "init"), str(tmp_path), logits, patch_logits, patch_split),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["dino"] for r in ranks]), sinkhorn_knopp(logits, 0.1))
    torch.testing.assert_close(torch.cat([r["ibot"] for r in ranks]), sinkhorn_knopp(patch_logits, 0.1))
    single = EmaCenter(dim=6)
    single.update(patch_logits)
    for r in ranks:
        torch.testing.assert_close(r["center"], single.center)
