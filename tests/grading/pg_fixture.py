"""pytest fixtures around ``tests/postgres_server.py``: a real PostgreSQL server per session.

Import them into a test module (or, once, into ``tests/grading/conftest.py`` to share one
server among every module of the folder)::

    from pg_fixture import postgres_db, postgres_url  # noqa: F401

* ``postgres_url`` (session): ``postgresql://nfcourse@127.0.0.1:PORT/nfcourse`` of a server
  started for this session (each pytest-xdist worker starts its own) and stopped after it;
* ``postgres_db`` (function): the URL of a fresh, empty database on that server, named after
  the test, so tests never see each other's tables.

Without PostgreSQL (the server binaries, or the driver SQLAlchemy picks for
``postgresql://``) the tests SKIP with the reason, except under ``CI=true``: CI installs
both, so there they FAIL.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

# `from postgres_server import ...`: the helper sits one folder up, in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from postgres_server import PostgresUnavailable, create_database, postgres_server  # noqa: E402

__all__ = ["driver_problem", "postgres_db", "postgres_url", "unavailable"]


def unavailable(reason: str) -> None:
    """Skip for want of PostgreSQL; under ``CI=true`` fail instead (CI installs it)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but PostgreSQL is not usable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


def driver_problem() -> str | None:
    """``None`` if SQLAlchemy can load its default driver for ``postgresql://`` URLs, else why
    not. That driver is psycopg (3) from SQLAlchemy 2.1 on, psycopg2 before."""
    from sqlalchemy.engine import make_url

    dialect = make_url("postgresql://").get_dialect()
    try:
        dialect.import_dbapi()
    except ImportError as e:
        return f"SQLAlchemy's driver for postgresql:// URLs ({dialect.driver}) is missing: {e}"
    return None


@pytest.fixture(scope="session")
def postgres_url():
    """URL of this session's throwaway PostgreSQL server (see ``tests/postgres_server.py``)."""
    problem = driver_problem()
    if problem is not None:
        unavailable(problem)
    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_server())
        except PostgresUnavailable as e:
            unavailable(str(e))
        yield url


@pytest.fixture
def postgres_db(postgres_url, request):
    """URL of a fresh database on the session's server, for this test alone."""
    stem = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return create_database(postgres_url, f"t_{stem}_{uuid.uuid4().hex[:8]}")
