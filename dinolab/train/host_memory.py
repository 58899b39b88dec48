"""Moved to :mod:`dinolab.utils.cpu_tuning`; kept as an alias until ``bench/train_step.py`` imports from there."""

from dinolab.utils.cpu_tuning import keep_freed_memory  # noqa: F401
