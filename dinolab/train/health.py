"""Training health: does each loss term learn, or does it sit where a student that learned nothing sits?

A pure function of the run's ``metrics.jsonl`` records (``RunLog``) and its config; the loop calls it at
the end of training, prints its messages as ``warning: ...`` lines and stores the flags in
``summary.json`` under ``"health"``.

**The uniform level.** The DINO and iBOT terms are cross-entropies ``CE(p, q) = -sum_k p_k log q_k`` of
the student's softmax ``q`` over ``K`` prototypes against the teacher's target ``p``. A student that
predicts the uniform distribution, ``q_k = 1/K``, has ``CE(p, q) = ln K * sum_k p_k = ln K`` *exactly*,
whatever the target (centred, sharpened, Sinkhorn-Knopp or not), because ``p`` sums to 1. So a term that
stays at ``ln K`` says the student predicts nothing, and the value alone shows it, without the targets.
The logged terms carry the loss weights and normalisations of ``SSLMetaArch.compute_losses``, so the
level each logged term takes at uniform is:

* DINO: ``dino.loss_weight * ln K_dino`` (``dino_loss`` is a mean over crop pairs and images);
* iBOT: ``ibot.loss_weight * ln K_ibot * f`` with ``K_ibot = ibot.head.n_prototypes`` (the DINO head's
  when ``ibot.separate_head`` is false) and ``f`` the fraction of global crops that are masked,
  ``int(2B * ibot.mask_sample_probability) / 2B`` (``B = train.batch_size_per_gpu``; ``ibot_loss`` sums
  the masked images' mean CE and divides by all ``2B`` global crops); ``f = 1`` in distillation (every
  patch of every crop). A masked crop that happens to draw no token (tiny token grids) lowers the level
  a little, so such a run can escape the flag.

**The rule.** A term *sits at ln K* when every value it logged over the last half of the run (records
with ``iteration >= last_iteration / 2``, at least the last one) lies within ``rel_tol`` (1 %) of its
uniform level. One record, early in a run, is near ``ln K`` anyway (a random head is nearly uniform):
the flag then says "not learning yet", which is what it is.

**Collapse.** The KoLeo term is ``koleo_loss_weight * sum over the 2 global-crop chunks of
-mean_i log d_i``, ``d_i`` the distance of a normalised class token to its nearest neighbour in the
batch, so ``exp(-koleo / (2 w))`` is the geometric mean of those distances: the class-token spread, free
in the log. Features have collapsed when it stays below ``collapse_distance`` (0.01 on the unit sphere,
where distances run from 0 to 2) over the last half of the run; without a KoLeo term there is no flag.

Left out: the teacher's target entropy. ``train_step`` returns the loss floats only and drops the
targets, so it is not available from the step's outputs without changing ``step.py``/``meta_arch.py``.
"""

from __future__ import annotations

import math

from dinolab.configs.schema import Config

REL_TOL = 0.01
COLLAPSE_DISTANCE = 0.01


def ibot_prototypes(cfg: Config) -> int:
    """The iBOT head's K: its own, or the DINO head's when the head is shared."""
    return cfg.ibot.head.n_prototypes if cfg.ibot.separate_head else cfg.dino.head.n_prototypes


def masked_fraction(cfg: Config) -> float:
    """Fraction of the ``2B`` global crops whose masked patches iBOT compares (1 in distillation)."""
    if cfg.distill.enabled:
        return 1.0
    n_images = 2 * cfg.train.batch_size_per_gpu
    return int(n_images * cfg.ibot.mask_sample_probability) / n_images


def uniform_levels(cfg: Config) -> dict[str, dict]:
    """``{"dino": {"K", "ln_k", "level"}, "ibot": {...}}``: the logged value of each term for a uniform student.

    A term that is off (zero weight, or no masked crops) is left out.
    """
    out = {}
    if cfg.dino.loss_weight > 0:
        k = cfg.dino.head.n_prototypes
        out["dino"] = {"K": k, "ln_k": math.log(k), "level": cfg.dino.loss_weight * math.log(k)}
    frac = masked_fraction(cfg)
    if cfg.ibot.loss_weight > 0 and frac > 0:
        k = ibot_prototypes(cfg)
        out["ibot"] = {"K": k, "ln_k": math.log(k), "level": cfg.ibot.loss_weight * math.log(k) * frac}
    return out


def _last_half(records: list[dict], term: str) -> list[float]:
    pts = [(r["iteration"], float(r[term])) for r in records if isinstance(r.get(term), (int, float))]
    if not pts:
        return []
    last = pts[-1][0]
    return [v for it, v in pts if it >= last / 2]


def health_flags(records: list[dict], cfg: Config, rel_tol: float = REL_TOL,
                 collapse_distance: float = COLLAPSE_DISTANCE) -> dict:
    """Metric records + config -> JSON-ready flags and one message (with what to try) per problem.

    Returns ``{"dino_at_uniform", "ibot_at_uniform", "collapse": bool, "uniform_level": {term: value},
    "last": {term: last logged value}, "cls_nn_distance": float | None, "messages": [str]}``.
    """
    levels = uniform_levels(cfg)
    flags: dict = {"dino_at_uniform": False, "ibot_at_uniform": False, "collapse": False,
                   "uniform_level": {t: v["level"] for t, v in levels.items()}, "last": {},
                   "cls_nn_distance": None, "messages": []}
    head_key = {"dino": "dino.head.n_prototypes",
                "ibot": "ibot.head.n_prototypes" if cfg.ibot.separate_head else "dino.head.n_prototypes"}
    for term, name in (("dino", "DINO"), ("ibot", "iBOT")):
        values = _last_half(records, term)
        if not values:
            continue
        flags["last"][term] = values[-1]
        if term not in levels:
            continue
        lv = levels[term]
        if all(abs(v - lv["level"]) <= rel_tol * lv["level"] for v in values):
            flags[f"{term}_at_uniform"] = True
            smaller = min(64, max(2, lv["K"] // 4))
            temp = cfg.teacher.teacher_temp  # halved down to 0.02, the sharpest that the main job uses
            sharper = max(0.02, round(temp / 2, 4)) if temp > 0.02 else None
            scale = "" if lv["level"] == lv["ln_k"] else f" (its uniform level {lv['level']:.3f} = weight x ln K x masked share)"
            flags["messages"].append(
                f"the {name} term sits at ln {lv['K']} = {lv['ln_k']:.3f}{scale} over the last {len(values)} "
                f"logged value(s) (last {values[-1]:.3f}): the student predicts the uniform distribution over "
                f"the prototypes and this term learns nothing; try fewer prototypes ({head_key[term]}={smaller}), "
                + (f"a sharper teacher (teacher.teacher_temp={sharper:g}), " if sharper else "")
                + "on small or grey images a weaker photometric augmentation (crops.color_jitter_p=0 "
                "crops.solarize_p=0: what made the main job's DINO term learn), or a longer warm-up "
                f"(optim.warmup_epochs, teacher.warmup_teacher_temp_epochs)")
    koleo = _last_half(records, "koleo")
    w = cfg.dino.koleo_loss_weight
    if koleo and w > 0:
        distances = [math.exp(-v / (2 * w)) for v in koleo]  # the geometric-mean nearest-neighbour distance
        flags["cls_nn_distance"] = distances[-1]
        if all(d < collapse_distance for d in distances):
            flags["collapse"] = True
            flags["messages"].append(
                f"the class tokens collapsed: their nearest-neighbour distance in a batch is {distances[-1]:.2g} "
                f"(from the KoLeo term; unit-sphere distances run 0-2) over the last {len(distances)} logged "
                f"value(s); try a larger dino.koleo_loss_weight, teacher.centering=sinkhorn_knopp, "
                f"a lower optim.base_lr or a longer warm-up (optim.warmup_epochs)")
    return flags
