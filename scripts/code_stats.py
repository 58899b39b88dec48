"""Figures of the code's shape: modules, lines, modules over 300 lines, the largest functions, function lengths.

    python scripts/code_stats.py [ROOT]      # ROOT: a checkout (default: this one); counts ROOT/dinolab/**.py

Function length is ``end_lineno - lineno + 1`` from the AST, docstrings included.
"""

from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path


def main(root: Path) -> None:
    files = sorted((root / "dinolab").rglob("*.py"))
    lines = {f.relative_to(root): len(f.read_text().splitlines()) for f in files}
    functions = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{f.relative_to(root)}:{node.name}"))
    functions.sort(reverse=True)
    lengths = sorted(n for n, _ in functions)
    print(f"{len(files)} modules, {sum(lines.values())} lines")
    print("over 300 lines:", ", ".join(f"{p} {n}" for p, n in lines.items() if n > 300) or "none")
    print("largest functions:", "; ".join(f"{name} {n}" for n, name in functions[:6]))
    print(f"function length: median {statistics.median(lengths)}, p90 {lengths[int(0.9 * len(lengths))]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
