"""Grading tests: they execute real notebooks through nbgrader (see harness.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `from harness import ...` in this folder's test modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# A throwaway PostgreSQL server for the tests that need one (one per xdist worker).
from pg_fixture import postgres_db, postgres_url  # noqa: E402,F401

# Notebooks run in fast mode; the grading kernel gets it from grading/nbgrader_config.py
# anyway, nbval's kernel from here.
os.environ.setdefault("NFCOURSE_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
