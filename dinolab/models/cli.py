"""``dinolab convert IN OUT``: the command over :func:`dinolab.models.convert.convert`."""

from __future__ import annotations

import argparse

from dinolab.models import convert as conversion


def run_convert(args: argparse.Namespace) -> int:
    print(conversion.convert(args.input, args.output, args.to, args.hf_naming))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert backbone weights between official, safetensors and HF")
    p.add_argument("input", help="weights file (.pth/.pt/.bin/.safetensors; official, training, dinolab or HF)")
    p.add_argument("output", help="output file")
    p.add_argument("--to", choices=conversion.TARGETS, default=None, help="output layout (default from the suffix)")
    p.add_argument("--hf-naming", choices=("v4", "v5"), default=None, help="HF key naming (default: installed)")
    p.set_defaults(func=run_convert)
