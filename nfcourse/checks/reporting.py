"""Turning a list of problems into what a student reads: the shared tail of every lesson check.

A lesson's ``<exercise>_problems(...)`` returns plain-words problems (an empty list means all
is well); ``check_<exercise>`` prints them with :func:`report_problems`, and :func:`attempt`
runs one step of a student's answer so that an exception becomes a problem, not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nfcourse.checks.core import _describe_exception
from nfcourse.removed import ExerciseRemoved

__all__ = ["report_problems", "attempt", "fast_mode_bar"]


def report_problems(title: str, problems: list[str]) -> bool:
    """Print ``✓ title`` or ``✗ title`` with one line per problem; True when there are none.

    Example:
        >>> report_problems("Squeeze", [])
        ✓ Squeeze: all checks passed
        True
    """
    if problems:
        print(f"✗ {title}: {len(problems)} problem{'s' * (len(problems) != 1)}")
        for p in problems:
            print(f"  - {p}")
        return False
    print(f"✓ {title}: all checks passed")
    return True


def attempt(what: str, fn: Callable[[], Any], problems: list[str]) -> Any:
    """``fn()``, or ``None`` with a plain-words problem appended when it raises.

    Example:
        >>> problems = []
        >>> attempt("Squeeze()", lambda: 1 / 0, problems) is None, len(problems)
        (True, 1)
    """
    try:
        return fn()
    except NotImplementedError:
        problems.append(f"{what} raised NotImplementedError: write your answer in its cell")
    except ExerciseRemoved as err:  # the answer reached a reference this lesson grades
        problems.append(str(err))
    except Exception as exc:  # the answer may raise anything: report it
        problems.append(_describe_exception(what, exc))
    return None


def fast_mode_bar(thresholds: dict[str, float], source: str = "mnist") -> float:
    """The bar a trained model must beat: ``thresholds["full"]`` in full mode, else the entry
    for the fast-mode data ``source`` (``lesson_images().source``), MNIST's by default."""
    from nfcourse.config import fast_mode

    return thresholds["full"] if not fast_mode() else thresholds.get(source, thresholds["mnist"])
