"""The ``nfcourse`` command (placeholder until the scaffolding lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    print("nfcourse")
    return 0
