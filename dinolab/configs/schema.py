"""Every training default, in one place: typed dataclasses (the official ``ssl_default_config``).

Presets (``presets/*.yaml``) are deltas over these defaults; command-line overrides are dotted
``key=value`` pairs (``optim.base_lr=1e-3``). :func:`load_config` merges the three, rejects unknown
keys and invalid values with one clear line before any work starts, and returns a validated
:class:`Config`. Derived values (the scaled lr, iteration counts) are computed where they are used
and never written back into the config.

Lengths are in *epochs* of ``optim.epoch_length`` iterations (official: 1,250), as in the official
configs, so a preset reads like the paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

# the preset helpers are imported here too, for the callers that import them from the schema
from dinolab.configs.merge import (  # noqa: F401
    DELTA_DIR,
    PRESET_DIR,
    check_finite,
    load_yaml,
    merge,
    preset_layers,
    preset_names,
)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# Every field whose value is one of a few names, with those names: the one place they are listed.
CHOICES: dict[str, tuple[str, ...]] = {
    "student.drop_path_mode": ("efficient", "mask"),
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused"),
    "teacher.centering": ("sinkhorn_knopp", "softmax"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "none"),
    "crops.blur_semantics": ("official_code", "paper"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.distributed": ("fsdp", "ddp"),
    "adapt.anchor_tokens": ("cls", "patch", "cls+patch"),
}


def _check_choice(key: str, value: str) -> None:
    """``value`` is one of ``CHOICES[key]``, else a ValueError naming every accepted value."""
    names = [repr(c) for c in CHOICES[key]]
    accepted = f"{', '.join(names[:-1])} or {names[-1]}"
    _check(value in CHOICES[key], f"{key} must be {accepted}, got {value!r}")


def _check_range(name: str, pair: list[float], lo: float, hi: float) -> None:
    _check(len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi, f"{name} must be [min, max] within [{lo}, {hi}], got {pair}")


@dataclass
class StudentConfig:
    """Backbone of student and teacher (the teacher never has drop path)."""

    arch: str = "vit_large"  # a dinolab arch name: vit_tiny/small/base/large/giant2 or vits14 ...
    patch_size: int = 16
    embed_dim: int | None = None  # None: the arch's own size; set to build a custom width
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.3
    drop_path_mode: str = "efficient"  # "efficient" (paper §5: skip dropped samples) or "mask"
    layerscale: float = 1e-5
    ffn_layer: str = "mlp"  # "mlp", "swiglu" or "swiglufused" (the same SwiGLU FFN, the official names)
    num_register_tokens: int = 0
    pretrained_weights: str | None = None  # initialise the student (and teacher) backbone from a file
    img_size: int | None = None  # position grid in pixels; None: crops.global_crops_size (--adapt: the weights' grid)
    freeze_backbone: bool = False  # train the heads only (e.g. heads for an official backbone, to distil from)

    def __post_init__(self) -> None:
        _check(0.0 <= self.drop_path_rate < 1.0, f"student.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _check_choice("student.drop_path_mode", self.drop_path_mode)
        _check_choice("student.ffn_layer", self.ffn_layer)
        _check(self.patch_size > 0, f"student.patch_size must be positive, got {self.patch_size}")


@dataclass
class HeadConfig:
    n_prototypes: int = 65536
    bottleneck_dim: int = 256
    hidden_dim: int = 2048
    nlayers: int = 3

    def __post_init__(self) -> None:
        _check(self.n_prototypes > 0 and self.bottleneck_dim > 0 and self.hidden_dim > 0 and self.nlayers >= 1,
               f"head sizes must be positive, got {self}")


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = True  # untied heads (paper Table 1, last row); False shares the DINO head
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        _check(0.0 <= self.mask_sample_probability <= 1.0, f"ibot.mask_sample_probability must be in [0, 1], got {self.mask_sample_probability}")
        _check_range("ibot.mask_ratio_min_max", self.mask_ratio_min_max, 0.0, 1.0)


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30
    centering: str = "sinkhorn_knopp"  # "sinkhorn_knopp" (paper, g14/l14 configs) or "softmax" (EMA centre)
    center_momentum: float = 0.9
    student_temp: float = 0.1

    def __post_init__(self) -> None:
        _check_choice("teacher.centering", self.centering)
        _check(0.0 <= self.momentum_teacher <= self.final_momentum_teacher <= 1.0,
               f"need 0 <= teacher.momentum_teacher <= final_momentum_teacher <= 1, got {self.momentum_teacher}, {self.final_momentum_teacher}")
        _check(min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp) > 0, "temperatures must be positive")


@dataclass
class OptimConfig:
    epochs: float = 100
    epoch_length: int = 1250  # iterations per "epoch" (official OFFICIAL_EPOCH_LENGTH)
    base_lr: float = 4e-3  # per 1,024 images, scaled by sqrt(global batch / 1024)
    scaling_rule: str = "sqrt_wrt_1024"  # or "none": use base_lr as is
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    freeze_last_layer_epochs: float = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    # High-resolution adaptation (paper App. B.2): run this many iterations in all, with every schedule
    # (warmup, cosine lr/wd, teacher momentum and temperature, last-layer freeze) compressed into them.
    compress_to_iters: int | None = None
    base_lr_scale: float = 1.0  # multiplies base_lr (high-res adaptation: a reduced lr)

    def __post_init__(self) -> None:
        _check(self.epochs > 0 and self.epoch_length > 0, f"optim.epochs and optim.epoch_length must be positive, got {self.epochs}, {self.epoch_length}")
        _check(0 <= self.warmup_epochs <= self.epochs, f"optim.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        _check(self.base_lr > 0 and self.min_lr >= 0, f"optim.base_lr must be > 0 and min_lr >= 0, got {self.base_lr}, {self.min_lr}")
        _check_choice("optim.scaling_rule", self.scaling_rule)
        _check(0 < self.layerwise_decay <= 1, f"optim.layerwise_decay must be in (0, 1], got {self.layerwise_decay}")
        _check(self.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")
        _check(self.compress_to_iters is None or self.compress_to_iters > 0,
               f"optim.compress_to_iters must be a positive number of iterations or null, got {self.compress_to_iters}")
        _check(self.base_lr_scale > 0, f"optim.base_lr_scale must be positive, got {self.base_lr_scale}")

    @property
    def total_iters(self) -> int:
        """Iterations of the run: ``compress_to_iters`` when set, else ``epochs * epoch_length``."""
        return self.compress_to_iters or round(self.epochs * self.epoch_length)

    def to_iters(self, epochs: float) -> int:
        """A length in epochs -> iterations, compressed by ``compress_to_iters / (epochs * epoch_length)``."""
        if self.compress_to_iters is None:
            return round(epochs * self.epoch_length)
        return round(epochs * self.epoch_length * self.compress_to_iters / (self.epochs * self.epoch_length))


@dataclass
class CropsConfig:
    global_crops_size: int = 224
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    blur_semantics: str = "official_code"  # "official_code" (what made the released weights) or "paper"
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # for 224-px crops; scale for small images
    color_jitter_p: float = 0.8  # probability of ColorJitter(brightness, contrast, saturation, hue)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    solarize_p: float = 0.2  # on the second global crop only

    def __post_init__(self) -> None:
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self, name)
            _check(size >= 1, f"crops.{name} must be a positive number of pixels, got {size}")
        _check_range("crops.global_crops_scale", self.global_crops_scale, 0.0, 1.0)
        _check_range("crops.local_crops_scale", self.local_crops_scale, 0.0, 1.0)
        _check(self.local_crops_number >= 0, f"crops.local_crops_number must be >= 0, got {self.local_crops_number}")
        _check_range("crops.blur_sigma", self.blur_sigma, 1e-6, 100.0)
        for name in ("color_jitter_p", "grayscale_p", "solarize_p"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"crops.{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            _check(getattr(self, name) >= 0.0, f"crops.{name} must be >= 0, got {getattr(self, name)}")
        _check(0.0 <= self.hue <= 0.5, f"crops.hue must be in [0, 0.5], got {self.hue}")
        _check_choice("crops.blur_semantics", self.blur_semantics)


@dataclass
class DataConfig:
    path: str | None = None  # folder, .txt list, .npz, .jsonl manifest; None: the embedded digits set
    eval_path: str | None = None  # labelled set for k-NN (npz or class folders); None: none (builtin: its test split)
    builtin_image_size: int = 32  # side the embedded 8x8 digits are upscaled to


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    seed: int = 0
    num_workers: int = 2
    precision: str = "auto"  # "auto" (bf16 where supported), "bf16", "fp16" (GPU only), "fp32"
    checkpoint_every: int = 3750  # iterations; 0 = only at the end
    keep_last: int = 3
    log_every: int = 10
    knn_every: int = 0  # iterations between k-NN evaluations on --eval-data (0: start and end only)
    knn_k: int = 20
    knn_image_size: int | None = None  # None: crops.global_crops_size
    max_iters: int | None = None  # stop early (e.g. a smoke run) without changing the schedules
    pack_crops: bool = True  # global + local crops through each block in one packed pass (paper §5)
    varlen_attention: bool = False  # packed crops attend in one nested-jagged SDPA call (CUDA's varlen FlashAttention); on CPU 0.5x the step
    activation_checkpointing: bool = False  # recompute the student's block activations in the backward: 0.72-0.81x peak memory, 0.81-0.88x images/s (ViT-S/14 bench)
    compile: bool = False  # torch.compile each block: 0.81-1.14x over 5 runs on a 2-core CPU (ViT-S/14 bench step), compiles in the first step
    keep_freed_memory: bool = True  # glibc keeps freed host memory for the next step (no fresh page faults): 1.12-1.25x on a 2-core CPU
    device: str = "auto"
    distributed: str = "fsdp"  # under torchrun with >1 process: "fsdp" (FSDP2, sharded) or "ddp" (replicated)
    init_from: str | None = None  # start a new run from a dinolab checkpoint (student, teacher, heads)
    # where scalars go: jsonl (always: resume reads metrics.jsonl), tensorboard, wandb, mlflow (dinolab.train.loggers)
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])

    def __post_init__(self) -> None:
        from dinolab.train.loggers import check_names

        check_names(self.loggers)
        _check(self.batch_size_per_gpu > 0, f"train.batch_size_per_gpu must be positive, got {self.batch_size_per_gpu}")
        _check_choice("train.precision", self.precision)
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check_choice("train.distributed", self.distributed)


@dataclass
class AdaptConfig:
    """Continued pretraining of a released backbone (``dinolab train --adapt WEIGHTS``): the student and the
    teacher start from ``student.pretrained_weights``; for ``head_warmup_iters`` only the (random) heads
    train, the backbone frozen; then the whole model, with an optional feature anchor to the source."""

    weights: str | None = None  # the source weights as given (file or run folder); set by --adapt
    head_warmup_iters: int | None = None  # None: head_warmup_fraction of the run's iterations
    head_warmup_fraction: float = 0.1
    anchor_weight: float = 0.0  # x mean(1 - cos) to a frozen copy of the source backbone, logged as `anchor`
    anchor_tokens: str = "cls+patch"  # "cls", "patch" (mean patch token) or "cls+patch" (their mean)

    def __post_init__(self) -> None:
        _check(0.0 <= self.head_warmup_fraction < 1.0,
               f"adapt.head_warmup_fraction must be in [0, 1), got {self.head_warmup_fraction}")
        _check(self.anchor_weight >= 0.0, f"adapt.anchor_weight must be >= 0, got {self.anchor_weight}")
        _check_choice("adapt.anchor_tokens", self.anchor_tokens)

    @property
    def enabled(self) -> bool:
        return self.weights is not None


@dataclass
class DistillConfig:
    """Distillation (paper §5): a frozen teacher from a dinolab run, a smaller student without masking
    or stochastic depth, and an EMA of the student as the final model."""

    teacher_checkpoint: str | None = None  # a dinolab checkpoint (RUN/checkpoints/ckpt_*.pth or dcp_*/)
    teacher_config: str | None = None  # the teacher run's config.yaml (None: the one next to the checkpoint)

    @property
    def enabled(self) -> bool:
        return self.teacher_checkpoint is not None


@dataclass
class Config:
    student: StudentConfig = field(default_factory=StudentConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def __post_init__(self) -> None:
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.crops, name)
            _check(size % self.student.patch_size == 0,
                   f"crops.{name}={size} must be a multiple of student.patch_size={self.student.patch_size}")
        if self.distill.enabled:
            _check(self.student.drop_path_rate == 0,
                   "distillation trains the student without stochastic depth (paper §5): "
                   f"set student.drop_path_rate=0, got {self.student.drop_path_rate}")
            _check(not self.student.freeze_backbone, "student.freeze_backbone cannot be combined with distillation")
        if self.adapt.enabled:
            _check(not self.distill.enabled, "--adapt cannot be combined with distillation (--distill-from)")
            _check(self.student.pretrained_weights is not None,
                   "adapt.weights needs student.pretrained_weights (dinolab train --adapt sets both)")


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> Config:
    """Defaults <- preset YAML (a name or a path) <- ``base`` dict <- ``key=value`` overrides -> Config.

    Raises:
        ValueError: unknown preset, unknown key, malformed override or invalid value (one line).
    """
    return _load([preset] if preset else [], overrides, base)


def load_run_config(run_config: str | Path, preset: str, overrides: list[str] | tuple[str, ...] = (),
                    base: dict | None = None) -> Config:
    """Defaults <- a run's saved ``config.yaml`` <- a preset's deltas <- ``base`` <- overrides -> Config.

    How a run is continued under another recipe, e.g. high-resolution adaptation (``preset="highres"``:
    the deltas of ``deltas/highres.yaml``). ``preset`` names a delta file of ``deltas/``, a preset or a path.

    Raises:
        FileNotFoundError: no such config file.
        ValueError: as :func:`load_config`.
    """
    if not Path(run_config).is_file():
        raise FileNotFoundError(f"run config {run_config} does not exist")
    delta = DELTA_DIR / f"{preset}.yaml"
    return _load([str(run_config), str(delta) if delta.is_file() else preset], overrides, base)


def _load(presets: list[str], overrides: list[str] | tuple[str, ...], base: dict | None) -> Config:
    layers = [layer for p in presets for layer in preset_layers(p)] + ([OmegaConf.create(base)] if base else [])
    return merge(Config, layers, overrides, context="invalid config", check=check_finite)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
