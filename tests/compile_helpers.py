"""What the compile tests share: setup.py's compiler flag lists, read without running
setup.py (which would build), and compiling each source in parallel."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
Result = TypeVar("Result")


def setup_flags(name: str) -> list[str]:
    """The list literal assigned to ``name`` at the top level of setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name} list")


def compile_each(sources: list[Path], compile_one: Callable[[Path], Result]) -> dict[str, Result]:
    """{source file name: compile_one(source)}, the compilers running in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, sources))
    return {s.name: r for s, r in zip(sources, results)}
