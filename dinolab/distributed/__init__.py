"""Training on several processes: the torchrun process group (``env``), FSDP2 / DDP wrapping of the
meta-architecture (``fsdp``) and ``torch.distributed.checkpoint`` save / load / consolidation (``checkpoint``)."""
