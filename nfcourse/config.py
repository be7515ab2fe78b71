"""Run-wide switches read from the environment."""

from __future__ import annotations

import os

__all__ = ["fast_mode", "data_root"]


def fast_mode() -> bool:
    """True when ``NFCOURSE_FAST`` is set to a true value: lessons shrink data and steps.

    Example:
        >>> steps = 300 if fast_mode() else 20_000
    """
    return os.environ.get("NFCOURSE_FAST", "").strip().lower() in {"1", "true", "yes", "on"}


def data_root() -> str:
    """Where datasets are cached: ``$NFCOURSE_DATA`` or ``~/.cache/nfcourse``."""
    return os.environ.get("NFCOURSE_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "nfcourse"
    )
