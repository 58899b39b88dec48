"""Moved to :mod:`dinolab.utils.cpu_tuning`; kept as an alias until its importers (``losses/soft_ce.py``,
``losses/centering.py``, ``models/heads.py``) import from there."""

from dinolab.utils.cpu_tuning import BLOCK_FLOATS, block_rows  # noqa: F401
