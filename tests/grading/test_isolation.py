"""The pieces that keep one submission from stopping the class, without kernels.

* :mod:`nfcourse.grade.workers`: a job that blows the worker's memory cap, crashes it,
  hangs or raises fails alone; the next job runs in a fresh worker.
* :mod:`nfcourse.grade.submission`: each malformed file gets one clear sentence.
"""

from __future__ import annotations

import json
import os
import time

import nbformat
import pytest

from nfcourse.grade.submission import SubmissionError, check_submission
from nfcourse.grade.workers import Job, Pool

HERE = "test_isolation"


# ------------------------------------------------------------------ jobs run in workers
def allocate(mb: int) -> int:
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
        block[i] = 1
    return len(block)


def crash() -> None:
    os._exit(7)


def hang() -> None:
    time.sleep(600)


def fail() -> None:
    raise ValueError("bad input")


def test_a_job_over_the_memory_cap_fails_alone():
    with Pool(1, 300) as pool:
        jobs = [Job("small", f"{HERE}:allocate", {"mb": 10}),
                Job("huge", f"{HERE}:allocate", {"mb": 2000}),
                Job("after", f"{HERE}:allocate", {"mb": 10})]
        outcomes = {o.key: o for o in pool.run(jobs, timeout=120)}
        assert outcomes["small"].value == 10 * 1024 * 1024 and outcomes["small"].error is None
        assert "300 MB memory cap" in outcomes["huge"].error
        assert outcomes["after"].value == 10 * 1024 * 1024
        assert pool.restarts == 1
        assert 0 < outcomes["after"].peak_mb < 300


def test_crashes_hangs_and_errors_fail_alone():
    with Pool(2, 500) as pool:
        jobs = [Job("crash", f"{HERE}:crash"), Job("hang", f"{HERE}:hang"),
                Job("fail", f"{HERE}:fail"), Job("ok", f"{HERE}:allocate", {"mb": 1})]
        started = time.monotonic()
        outcomes = {o.key: o for o in pool.run(jobs, timeout=5)}
        assert time.monotonic() - started < 60
    assert outcomes["crash"].error == "the grading process exited with status 7"
    assert outcomes["hang"].error == "grading took longer than 5 s and was stopped"
    assert outcomes["fail"].error == "ValueError: bad input"
    assert outcomes["ok"].value == 1024 * 1024


def test_a_pool_needs_a_worker_and_a_sane_cap():
    with pytest.raises(ValueError, match="at least one worker"):
        Pool(0, 500)
    with pytest.raises(ValueError, match="at least 64 MB"):
        Pool(1, 10)


# ---------------------------------------------------------------- reading a submission
def _good() -> bytes:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.id = "answer"  # nbformat draws ids at random; xdist workers must collect the same tests
    cell.metadata["nbgrader"] = {"grade": False, "grade_id": "a", "locked": False,
                                 "schema_version": 3, "solution": True, "task": False}
    nb.cells = [cell]
    return nbformat.writes(nb).encode()


@pytest.mark.parametrize("name, data, message", [
    ("cut", _good()[:40], r"not valid JSON \(the file is cut off\)"),
    ("cut_in_a_string", _good()[: _good().index(b"x = 1") + 2],
     r"not valid JSON \(the file is cut off\)"),
    ("not_json", b"{\"cells\": [}", r"not valid JSON: Expecting value at line 1"),
    ("utf8", _good().replace(b'"x = 1"', b'"x = \xff"'), r"not valid UTF-8 \(byte 0xff at offset"),
    ("v3", json.dumps({"nbformat": 3, "nbformat_minor": 0, "worksheets": [],
                       "metadata": {}}).encode(), r"nbformat 3; this grader reads nbformat 4"),
    ("schema", _good().replace(b'"schema_version": 3', b'"schema_version": 4'),
     r"cell 0 has nbgrader metadata of schema version 4"),
    ("list", b"[1, 2]", r"JSON but not a notebook"),
    ("cells", json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                          "cells": [{"cell_type": "code"}]}).encode(), r"not a valid notebook"),
])
def test_malformed_files_get_one_clear_sentence(tmp_path, name, data, message):
    path = tmp_path / "lesson.ipynb"
    path.write_bytes(data)
    with pytest.raises(SubmissionError, match=message) as caught:
        check_submission(path)
    assert "\n" not in str(caught.value)


def test_a_good_notebook_passes_and_a_missing_one_is_named(tmp_path):
    path = tmp_path / "lesson.ipynb"
    path.write_bytes(_good())
    check_submission(path)
    # damaged outputs alone do not stop grading: outputs are cleared before it runs
    nb = json.loads(_good())
    nb["cells"][0]["outputs"] = [{"output_type": "bogus"}]
    path.write_text(json.dumps(nb))
    check_submission(path)
    path.unlink()
    (tmp_path / "other.ipynb").write_bytes(_good())
    with pytest.raises(SubmissionError, match=r"no notebook lesson.ipynb .*found: other.ipynb"):
        check_submission(path)
