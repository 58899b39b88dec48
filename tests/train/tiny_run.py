"""Overrides that turn the cpu preset into a tiny run (seconds on a CPU), shared by the training tests.

The schedule is 3-iteration epochs with 1-epoch warmups; each test adds its own ``optim.epochs``.
"""

TINY_RUN = [
    "student.embed_dim=32", "student.num_heads=2", "student.depth=2",
    "dino.head.n_prototypes=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
    "ibot.head.n_prototypes=64", "ibot.head.hidden_dim=32", "ibot.head.bottleneck_dim=16",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "train.batch_size_per_gpu=8", "train.num_workers=0", "train.log_every=1", "train.knn_every=0",
    "train.checkpoint_every=0", "train.precision=fp32", "optim.epoch_length=3",
    "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", "teacher.teacher_temp=0.07",
    "train.compile=false",  # the cpu preset compiles; a tiny run would spend its time compiling
]
