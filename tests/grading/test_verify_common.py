"""What every lesson's independent check must do alike: a kernel that says nothing, answers
garbage or answers with arrays of the wrong size fails every exercise with a message (never
a pass, never a crash of the grader)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from harness import REPO, solution_cells

from nfcourse.grade.verify import Oracle, OracleError, review_notes, verifier_for

LESSONS = sorted(p.name for p in (REPO / "solutions").iterdir() if p.is_dir())


def _marker(code: str) -> str | None:
    found = re.search(r"@@nfv-[0-9a-f]+@@", code)
    return found.group() if found else None


def silent(code: str, timeout: float) -> str:
    return ""


def garbage(code: str, timeout: float) -> str:
    marker = _marker(code)
    return (marker + "{not json\n") if marker else "noise\n"


def truncated_array(code: str, timeout: float) -> str:
    """An array whose bytes do not fill its shape."""
    marker = _marker(code)
    answer = {"ok": True, "out": {"z": {"shape": [2], "data": "AAAA"}}}
    return (marker + json.dumps(answer) + "\n") if marker else ""


def ones_everywhere(code: str, timeout: float) -> str:
    """Every output the query asks for, as the single number 1.0."""
    marker = _marker(code)
    if not marker:
        return ""
    names = set(re.findall(r"out\['(\w+)'\]", code))
    spec = {"shape": [1], "data": "AAAAAAAA8D8="}  # one float64 1.0
    return marker + json.dumps({"ok": True, "out": {n: spec for n in names}}) + "\n"


@pytest.mark.parametrize("lesson", LESSONS)
@pytest.mark.parametrize("execute", [silent, garbage, truncated_array, ones_everywhere],
                         ids=lambda f: f.__name__)
def test_a_lying_or_silent_kernel_fails_every_exercise(lesson, execute):
    verifier = verifier_for(lesson)
    assert verifier is not None and verifier.lesson == lesson, f"{lesson}: no independent check"
    verdicts = verifier.run(Oracle(execute), [], np.random.default_rng(0))
    assert [v.grade_id for v in verdicts] == list(verifier.checks)
    assert [v.passed for v in verdicts] == [False] * len(verifier.checks)
    assert all(v.message for v in verdicts)


def test_a_silent_kernel_is_named_in_the_error():
    with pytest.raises(OracleError, match="no answer"):
        Oracle(silent).query("out['x'] = 1")


@pytest.mark.parametrize("lesson", LESSONS)
def test_an_honest_solution_has_nothing_to_review(lesson):
    """The review list is for code a lesson never needs: the solution's cells give none."""
    assert review_notes([source for _, source in solution_cells(lesson)]) == []
