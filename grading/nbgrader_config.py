"""nbgrader configuration of the course (nbgrader 0.9.x).

Loaded by ``nfcourse grade ...`` (see ``grading/README.md``); the plain ``nbgrader`` command
reads it when run inside ``grading/`` or with ``JUPYTER_CONFIG_PATH=grading`` from the root.
Every path is relative to the course root, which is the repository root (computed from this file's
location) unless ``NFCOURSE_COURSE_ROOT`` names another one (the tests grade in copies).

Layout (nbgrader's ``{nbgrader_step}/{student_id}/{assignment_id}``):

    solutions/NN_slug/NN_slug.ipynb                 source (answers + hidden tests)
    lessons/NN_slug/NN_slug.ipynb                   release (committed, generated)
    grading/submitted/STUDENT/NN_slug/...           collected submissions   (git-ignored)
    grading/autograded/STUDENT/NN_slug/...          executed and scored     (git-ignored)
    grading/feedback/STUDENT/NN_slug/NN_slug.html   feedback                (git-ignored)
    grading/gradebook.db                            gradebook (hidden tests live here)
"""

import os

c = get_config()  # noqa: F821  (provided by traitlets' config loader)

ROOT = os.path.abspath(
    os.environ.get("NFCOURSE_COURSE_ROOT")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
)

# --- where things are -------------------------------------------------------------------
c.CourseDirectory.root = ROOT
c.CourseDirectory.course_id = "nfcourse"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "lessons"
c.CourseDirectory.submitted_directory = os.path.join("grading", "submitted")
c.CourseDirectory.autograded_directory = os.path.join("grading", "autograded")
c.CourseDirectory.feedback_directory = os.path.join("grading", "feedback")
c.CourseDirectory.solution_directory = os.path.join("grading", "solution")
c.CourseDirectory.source_with_tests_directory = os.path.join("grading", "source_with_tests")
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(ROOT, "grading", "gradebook.db")
# Files never copied from solutions/ into lessons/ (or over a submission): only the
# notebook and small assets it reads travel.
c.CourseDirectory.ignore = [
    ".ipynb_checkpoints",
    "*.pyc",
    "__pycache__",
    "feedback",
    "runs",
    "artifacts",
    "*.gif",
    "*.pt",
    "*.ckpt",
    ".DS_Store",
]
c.CourseDirectory.max_file_size = 2000  # kB: assets are small; anything bigger is a mistake

# --- releasing ----------------------------------------------------------------------------
c.ClearSolutions.code_stub = {
    "python": "# YOUR CODE HERE\nraise NotImplementedError()",
}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.LockCells.lock_grade_cells = True
c.LockCells.lock_readonly_cells = True

# --- autograding --------------------------------------------------------------------------
# Every submission runs in the same kernel, whatever the student's notebook says.
c.Execute.kernel_name = "python3"
# Seconds per cell; `nfcourse grade` replaces it with NfcourseGrade.lesson_timeouts[lesson].
c.Execute.timeout = 300
c.Execute.interrupt_on_timeout = True
# Nothing a student wrote into cell metadata counts: SanitizeSubmission rebuilds every cell's
# nbgrader metadata from the gradebook (a cell it does not know becomes an ordinary cell, so
# a student-made "grade cell" adds no points; flipped flags and points are put back) and drops
# the tags that change execution (skip-execution, raises-exception); ClearOutput removes
# pre-filled outputs. A deleted test cell comes back (and is graded) instead of silently
# giving no score; an edited one is restored from the gradebook. A split or copied test cell:
# the last copy keeps the id (and is restored), the others become ordinary cells
# (DropEmptyNbgraderMetadata works around nbgrader 0.9 failing on them).
c.OverwriteCells.add_missing_cells = True
try:
    from nbgrader.preprocessors import (
        CheckCellMetadata,
        ClearOutput,
        DeduplicateIds,
        OverwriteCells,
        OverwriteKernelspec,
    )

    from nfcourse.grade.preprocessors import DropEmptyNbgraderMetadata, SanitizeSubmission

    c.Autograde.sanitize_preprocessors = [
        SanitizeSubmission,
        ClearOutput,
        DeduplicateIds,
        DropEmptyNbgraderMetadata,
        OverwriteKernelspec,
        OverwriteCells,
        CheckCellMetadata,
    ]
    # nbgrader's pipeline with its Execute replaced: the kernel runs in a sandbox, survives
    # crashes, has a time budget and an output cap, and the lesson's independent check runs
    # in this process afterwards (nfcourse/grade/execute.py).
    from nbconvert.preprocessors import ClearMetadataPreprocessor
    from nbgrader.preprocessors import (
        AssignLatePenalties,
        IgnorePattern,
        LimitOutput,
        SaveAutoGrades,
    )

    from nfcourse.grade.execute import GradingExecute
    from nfcourse.grade.preprocessors import SanitizeOutputs

    # SanitizeOutputs last: the autograded notebook (what the formgrader and the feedback
    # render) keeps no script, event handler, javascript: URL, SVG or widget state.
    c.Autograde.autograde_preprocessors = [
        GradingExecute,
        IgnorePattern,
        ClearMetadataPreprocessor,
        LimitOutput,
        SaveAutoGrades,
        AssignLatePenalties,
        CheckCellMetadata,
        SanitizeOutputs,
    ]
    # Feedback: the hidden tests' code (restored into the autograded notebook from the
    # gradebook) is cut out, test tracebacks keep only the error's name and message, and
    # HTML is sanitised again when rendered (nbgrader 0.9.6 does neither).
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.preprocessors import GetGrades

    from nfcourse.grade.preprocessors import HideHiddenTests, clean_html

    c.GenerateFeedback.preprocessors = [
        GetGrades,
        HideHiddenTests,
        SanitizeOutputs,
        CSSHTMLHeaderPreprocessor,
    ]
    # The feedback and the formgrader render through nbconvert's HTMLExporter: sanitise
    # Markdown and HTML there too, with the course's allow-list (nbconvert's own filter
    # escapes headings and table headers).
    c.HTMLExporter.sanitize_html = True
    c.HTMLExporter.filters = {"clean_html": clean_html}
except ImportError:  # nfcourse not installed: plain nbgrader behaviour
    pass
# Progress bars write to stderr; drop those outputs from the graded copy and the feedback.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"\d+%\|[^|]*\|"
c.LimitOutput.max_lines = 200
c.LimitOutput.max_traceback = 60

# --- the sandbox (nfcourse/grade/sandbox.py): limits of one grading kernel ---------------
c.SandboxedKernelManager.memory_mb = 3072
c.SandboxedKernelManager.processes = 128
c.SandboxedKernelManager.tmp_mb = 256
c.SandboxedKernelManager.file_mb = 64
# The kernel's working folder: a tmpfs (MB) holding a copy of the submission (nothing of it
# on the host's disk). The grader's sockets: largest frame (MB; a bigger one drops the
# connection, so the kernel looks dead) and messages queued per socket.
c.SandboxedKernelManager.work_mb = 256
c.SandboxedKernelManager.max_message_mb = 64
c.SandboxedKernelManager.receive_queue = 4
# Whole-notebook budget (seconds) and printed output kept (MB); per-cell timeouts below.
c.GradingExecute.notebook_timeout = 900
c.GradingExecute.output_mb = 2.0
# The independent check: seconds per query and in all (past the budget the kernel is killed
# and every exercise not yet decided fails).
c.GradingExecute.verify_timeout = 120
c.GradingExecute.verify_budget = 300

# --- nfcourse's own settings (read by nfcourse.grade, ignored by nbgrader) ---------------
# Memory (MB) of the grader's own process per submission, on top of the kernel's cap
# (SandboxedKernelManager.memory_mb): each submission is graded in a worker process capped at
# the sum, so one that makes the grader blow up fails alone (nfcourse/grade/workers.py).
c.NfcourseGrade.grader_memory_mb = 2048
# Per-lesson cell timeout in seconds for autograding (fast mode).
c.NfcourseGrade.lesson_timeouts = {
    "01_two_moons_realnvp": 120,
    "02_dequantization": 300,
    "03_coupling_layers": 300,
    "04_multiscale": 300,
    "05_glow": 300,
    "06_ffjord_gifs": 300,
}
# Environment of the grading kernel: fast mode, no progress bars, no display.
c.NfcourseGrade.kernel_env = {
    "NFCOURSE_FAST": "1",
    "TQDM_DISABLE": "1",
    "MPLBACKEND": "Agg",
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
}
