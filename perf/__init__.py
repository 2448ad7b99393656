"""Speed and kernel tools of the suite (``python -m perf.<tool>``; the Makefile's GPU and CPU performance targets)."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: Path | None, name: str) -> None:
    """Print a tool's markdown report, and write it to ``out / name`` when ``out`` is given."""
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
