"""``dinolab curate`` overrides: plain key=value anywhere (after --seeds too), '--' deprecated but working."""

from __future__ import annotations

import argparse

import pytest

from dinolab.cli import build_parser, parse_args
from dinolab.curate.cli import build_config, parse_named

BASE = ["curate", "--pool", "pool", "--out", "out"]


def _config(argv: list[str]):
    args = parse_args(build_parser(), argv)
    seeds, extra = parse_named(args.seeds, "--seeds")
    return seeds, build_config(args, extra)


def test_overrides_anywhere_on_the_line() -> None:
    seeds, cfg = _config([*BASE[:3], "dedup.k=7", *BASE[3:], "--seeds", "in1k=/data/in1k", "retrieve.cap=11"])
    assert seeds == {"in1k": "/data/in1k"}
    assert (cfg.dedup.k, cfg.retrieve.cap) == (7, 11)


def test_dashes_still_work_with_one_deprecation_line(capsys) -> None:
    _, cfg = _config([*BASE, "--", "dedup.k=9"])
    assert cfg.dedup.k == 9
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: '--' before overrides is deprecated and no longer needed: write them anywhere, "
                   "e.g. dinolab curate ... dedup.k=9"]
    _config([*BASE, "dedup.k=9"])
    assert capsys.readouterr().err == ""  # the plain spelling: no note


def test_a_bad_override_is_one_line_naming_the_key() -> None:
    args = argparse.Namespace(arch=None, weights=None, recompute=False, hierarchical=False, overrides=["dedup.k=x"])
    with pytest.raises(ValueError, match=r"^bad override: dedup.k: Value 'x' of type 'str' could not be converted"):
        build_config(args)
