"""The assembled training step against an independent restatement of the official DINOv2 formulas.

The reference below is written from the official code (facebookresearch/dinov2 ``ssl_meta_arch.py``
``forward_backward``, ``loss/dino_clstoken_loss.py``, ``loss/ibot_patch_loss.py``, ``loss/koleo_loss.py``,
``layers/dino_head.py``; /work/shared/RECIPE.md 2.2-2.5) and uses nothing of dinolab's losses, centering or
head function: only the backbone modules (plain calls, one per crop group, never packed), the heads'
parameters (MLP layers called as plain ``nn.Linear``/``nn.GELU``, the weight-normalised prototype layer
written out) and the batch's boolean masks. Everything runs in float64 without autocast and without drop
path, so the comparison with ``train_step`` is deterministic: loss terms and every student gradient at 1e-5.

Official formulas, 2 global crops, ``nL`` local crops, ``B`` images (student temperature 0.1):

* targets: teacher on the *unmasked* global crops; softmax centering
  ``softmax((t - c) / T_t)`` with the EMA centre ``c`` of earlier steps, or Sinkhorn-Knopp (3 iterations;
  ``B_total`` = 2B for DINO, the number of masked patches for iBOT);
* DINO: ``CE(s, t) = -sum_k t_k log_softmax(s / 0.1)_k``; global term = mean over the 2B rows of
  CE(student crop A, teacher crop B) and (B, A), times 2; local term = sum over (local crop, teacher crop)
  of the mean over B; both divided by ``n_global_terms + n_local_terms = 2 + max(2 nL, 1)``;
* iBOT: ``sum_masked-tokens CE / #masked(image) / 2B * 2 * (1/2)``;
* KoLeo: ``0.1 * sum over the 2 global chunks of -mean log(||x - x_nn + eps|| + eps)`` on the
  L2-normalised pre-head class tokens (neighbour by inner product, self excluded);
* each term times its config weight.

One known deviation, kept as a strict xfail (``NO_LOCAL_XFAIL``): without local crops dinolab divides the DINO
term by its 2 pairs, not by the official 3; ``test_without_local_crops_only_the_dino_denominator_differs`` pins
that everything else of those cases is official.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinolab.configs import load_config
from dinolab.data.collate import collate_crops
from dinolab.data.masking import MaskingGenerator
from dinolab.train.build import build_optimizer
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.schedules import ScheduleValues
from dinolab.train.step import train_step
from tiny_run import TINY_RUN

STUDENT_TEMP = 0.1  # official, both losses
SK_ITERATIONS = 3  # official
TEACHER_TEMP = 0.05
B = 3  # images; 2B = 6 global crops of which int(6 * 0.5) = 3 masked
WEIGHTS = {"dino.loss_weight": 0.7, "ibot.loss_weight": 1.3, "dino.koleo_loss_weight": 0.2}  # not the defaults


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread


# ----------------------------------------------------------------------------- the official formulas
def head_logits(head, x):
    """Official DINOHead: MLP -> L2 normalise -> weight_norm(Linear(bottleneck, K, bias=False))."""
    for layer in head.mlp if isinstance(head.mlp, torch.nn.Sequential) else [head.mlp]:
        x = layer(x)
    x = F.normalize(x, dim=-1, p=2, eps=1e-12)
    g = head.last_layer.parametrizations.weight.original0  # [K, 1]
    v = head.last_layer.parametrizations.weight.original1  # [K, bottleneck]
    return x @ (g * v / v.norm(dim=1, keepdim=True)).t()


def sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_samples):
    """Official ``sinkhorn_knopp_teacher`` (one process)."""
    Q = torch.exp(teacher_output / teacher_temp).t()  # K x B
    K = Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(SK_ITERATIONS):
        Q = Q / Q.sum(dim=1, keepdim=True)
        Q = Q / K
        Q = Q / Q.sum(dim=0, keepdim=True)
        Q = Q / n_samples
    return (Q * n_samples).t()


def center_teacher(logits, centering, center, n_samples):
    if centering == "sinkhorn_knopp":
        return sinkhorn_knopp_teacher(logits, TEACHER_TEMP, n_samples)
    return F.softmax((logits - center) / TEACHER_TEMP, dim=-1)


def ce(teacher_probs, student_logits):
    """Per-row ``-sum_k t_k log_softmax(s / student_temp)_k``."""
    return -(teacher_probs * F.log_softmax(student_logits / STUDENT_TEMP, dim=-1)).sum(-1)


def koleo(x, eps=1e-8):
    """Official KoLeoLoss: dots with the diagonal at -1, argmax, PairwiseDistance(2, eps=1e-8)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.t()
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
        nn = dots.argmax(dim=1)
    distances = ((x - x[nn] + eps) ** 2).sum(-1).sqrt()
    return -torch.log(distances + eps).mean()


def _center(meta, which):
    """The EMA centre of the earlier steps (a buffer read; softmax centering only)."""
    module = getattr(meta, f"{which}_center", None)
    return None if module is None else module.center


def official_losses(meta, batch, cfg, *, no_local_denominator="official"):
    """Loss terms of the official ``forward_backward`` on ``batch``, from plain module calls.

    ``no_local_denominator``: with no local crops the official code divides the 2 global DINO pairs by
    ``2 + max(0, 1) = 3``; ``"pairs"`` divides by the number of pairs, 2 (dinov3, and dinolab's choice).
    """
    centering = cfg.teacher.centering
    student, teacher = meta.student, meta.teacher
    shared = not cfg.ibot.separate_head
    g, l, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    n_local = l.shape[0] // B
    masked_images = [i for i in range(2 * B) if masks[i].any()]

    # ---- teacher: unmasked global crops
    with torch.no_grad():
        t_out = teacher.backbone(g, is_training=True)
        t_cls = t_out["x_norm_clstoken"]  # [2B, D], crop-major
        t_cls = torch.cat(t_cls.chunk(2)[::-1])  # official swap: student crop A is matched to teacher crop B
        t_dino_logits = head_logits(teacher.dino_head, t_cls)
        t_dino = center_teacher(t_dino_logits, centering, _center(meta, "dino"), 2 * B)
        t_patches = torch.cat([t_out["x_norm_patchtokens"][i][masks[i]] for i in masked_images])  # [M, D]
        t_ibot_logits = head_logits(teacher.dino_head if shared else teacher.ibot_head, t_patches)
        t_ibot = center_teacher(t_ibot_logits, centering, _center(meta, "ibot"), t_patches.shape[0])

    # ---- student: masked global crops and local crops, separate forwards
    s_g = student.backbone(g, masks, is_training=True)
    s_global_cls = s_g["x_norm_clstoken"]  # [2B, D]
    s_dino_global = head_logits(student.dino_head, s_global_cls)

    n_global_terms = (2 - 1) * 2
    n_local_terms = max(n_local * 2, 1)
    if n_local == 0 and no_local_denominator == "pairs":
        n_local_terms = 0
    denominator = n_global_terms + n_local_terms
    dino = ce(t_dino, s_dino_global).mean() * 2 / denominator  # loss_scales = 2: global crops together
    if n_local:
        s_dino_local = head_logits(student.dino_head, student.backbone(l, is_training=True)["x_norm_clstoken"])
        for s in s_dino_local.chunk(n_local):
            for t in t_dino.chunk(2):
                dino = dino + ce(t, s).mean() / denominator

    # iBOT: each masked image's tokens weighted 1 / #masked, summed, / 2B, x 2 x (1 / 2)
    s_patches = torch.cat([s_g["x_norm_patchtokens"][i][masks[i]] for i in masked_images])
    s_ibot = head_logits(student.dino_head if shared else student.ibot_head, s_patches)
    weights = torch.cat([torch.full((int(masks[i].sum()),), 1.0 / int(masks[i].sum()), dtype=g.dtype)
                         for i in masked_images])
    ibot = (ce(t_ibot, s_ibot) * weights).sum() / (2 * B) * 2 * (1 / 2)

    koleo_term = sum(koleo(x) for x in s_global_cls.chunk(2))

    losses = {
        "dino": cfg.dino.loss_weight * dino,
        "ibot": cfg.ibot.loss_weight * ibot,
        "koleo": cfg.dino.koleo_loss_weight * koleo_term,
    }
    losses["total"] = losses["dino"] + losses["ibot"] + losses["koleo"]
    return losses, {"dino": t_dino_logits, "ibot": t_ibot_logits}


# ----------------------------------------------------------------------------- the comparison
def _setup(centering, separate_head, pack, n_local):
    overrides = [*TINY_RUN, "optim.epochs=2", "student.drop_path_rate=0.0",
                 f"teacher.centering={centering}", f"ibot.separate_head={str(separate_head).lower()}",
                 f"train.pack_crops={str(pack).lower()}", f"crops.local_crops_number={n_local}",
                 "dino.head.n_prototypes=48", "ibot.head.n_prototypes=40", "ibot.head.bottleneck_dim=12",
                 *(f"{k}={v}" for k, v in WEIGHTS.items())]
    cfg = load_config("cpu", overrides)
    assert cfg.teacher.student_temp == STUDENT_TEMP
    torch.manual_seed(0)
    meta = SSLMetaArch.from_config(cfg).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a teacher some steps behind the student, a used mask token, a non-zero centre
        for p in meta.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        meta.student.backbone.mask_token.normal_(0, 0.5, generator=gen)
        if centering == "softmax":
            for c in (meta.dino_center, meta.ibot_center):
                c.center.copy_(0.3 * torch.randn(c.center.shape, generator=gen, dtype=c.center.dtype))
    gs, ls, n = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.global_crops_size // cfg.student.patch_size
    samples = [{"global_crops": [torch.randn(3, gs, gs, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, ls, ls, generator=gen) for _ in range(n_local)]} for _ in range(B)]
    batch = collate_crops(samples, mask_generator=MaskingGenerator((n, n), max_num_patches=0.5 * n * n),
                          n_tokens=n * n, dtype=torch.float64, rng=np.random.default_rng(0))
    assert 0 < int(batch["masks"].any(-1).sum()) < 2 * B and batch["masks"].sum() > 2  # masked and unmasked crops
    return meta, batch, cfg


def _check_step(centering, separate_head, pack, n_local, no_local_denominator="official"):
    meta, batch, cfg = _setup(centering, separate_head, pack, n_local)
    ref, teacher_logits = official_losses(meta, batch, cfg, no_local_denominator=no_local_denominator)
    named = [(k, p) for k, p in meta.student.named_parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref["total"], [p for _, p in named], allow_unused=True)
    centers_before = {w: _center(meta, w).clone() for w in ("dino", "ibot")} if centering == "softmax" else {}

    sched = ScheduleValues(lr=1e-3, last_layer_lr=1e-3, weight_decay=0.04, momentum=0.99, teacher_temp=TEACHER_TEMP)
    got = train_step(meta, build_optimizer(meta, cfg), batch, sched, 0, precision="fp32", clip_grad=0.0,
                     keep_grads=True)

    assert set(got) == set(ref)
    for name in ("ibot", "koleo", "dino", "total"):
        assert got[name] == pytest.approx(float(ref[name].detach()), rel=1e-5, abs=1e-7), name
    for (name, p), g_ref in zip(named, ref_grads):
        if g_ref is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()) + 1e-12,
                                   msg=lambda m, name=name: f"gradient of student.{name}: {m}")
    # official update_center, after the targets: c <- 0.9 c + 0.1 mean(teacher logits of the step): the 2B class
    # tokens (DINO), the masked patch tokens (iBOT)
    m = cfg.teacher.center_momentum
    for which, before in centers_before.items():
        expected = before * m + teacher_logits[which].mean(0, keepdim=True) * (1 - m)
        torch.testing.assert_close(_center(meta, which), expected, rtol=1e-5, atol=1e-7, msg=f"{which} centre")


NO_LOCAL_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="without local crops the official code divides the two global DINO pairs by "
    "n_global_terms + max(n_local_terms, 1) = 3; dinolab divides by the 2 pairs (as dinov3, documented in "
    "dinolab.losses.dino): dinolab's DINO term and its gradients are 1.5x the official ones",
)
COMBOS = [
    pytest.param(centering, separate, pack, n_local,
                 id=f"{centering}-{'untied' if separate else 'shared'}-{'packed' if pack else 'unpacked'}-local{n_local}",
                 marks=[NO_LOCAL_XFAIL] if n_local == 0 else [])
    for centering in ("softmax", "sinkhorn_knopp")
    for separate in (False, True)
    for pack in (True, False)
    for n_local in (0, 2)
]


@pytest.mark.parametrize("centering, separate_head, pack, n_local", COMBOS)
def test_train_step_matches_the_official_formulas(centering, separate_head, pack, n_local):
    _check_step(centering, separate_head, pack, n_local)


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate_head", [False, True], ids=["shared", "untied"])
def test_without_local_crops_only_the_dino_denominator_differs(centering, separate_head):
    """The known deviation above, pinned: with the DINO term divided by its 2 pairs, everything else is official."""
    _check_step(centering, separate_head, True, 0, no_local_denominator="pairs")
