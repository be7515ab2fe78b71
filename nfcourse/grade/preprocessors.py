"""nbgrader preprocessors the course's configuration adds to autograding.

:class:`SanitizeSubmission` runs first: it rebuilds every cell's nbgrader metadata from the
gradebook, so nothing a student wrote into metadata (a new grade cell, flipped flags,
points, a schema version) reaches the rest of the pipeline, and it removes the tags that
change how cells execute. :class:`DropEmptyNbgraderMetadata` works around nbgrader 0.9
after ``DeduplicateIds``.
"""

from __future__ import annotations

from nbformat.notebooknode import NotebookNode
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.preprocessors import NbGraderPreprocessor

__all__ = ["SanitizeSubmission", "DropEmptyNbgraderMetadata", "EXECUTION_TAGS"]

#: tags nbclient acts on: a test cell tagged ``skip-execution`` would keep whatever output
#: it came with, ``raises-exception`` changes what an error means
EXECUTION_TAGS = frozenset({"skip-execution", "raises-exception"})


class SanitizeSubmission(NbGraderPreprocessor):
    """Rebuild each cell's ``nbgrader`` metadata from the gradebook; drop execution tags.

    * a cell naming a grade id the gradebook knows gets that cell's metadata back (grade,
      solution, task and locked flags, points, schema version 3), whatever it said;
    * a cell naming an unknown grade id, or none, becomes an ordinary cell (its ``nbgrader``
      metadata removed): its code still runs, it just scores nothing;
    * every cell loses the tags in :data:`EXECUTION_TAGS`; the gradebook's cells (tests,
      answers, locked cells) lose all their tags, as the instructor's copies have none.

    ``OverwriteCells`` after it restores the sources of locked cells and re-adds missing
    test cells; ``ClearOutput`` removes pre-filled outputs.

    Example (``grading/nbgrader_config.py``)::

        c.Autograde.sanitize_preprocessors = [SanitizeSubmission, ClearOutput, ...]
    """

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            try:
                notebook = gb.find_notebook(info["notebook"], info["assignment"])
            except MissingEntry:
                # No such notebook in the gradebook: nbgrader skips it anyway; with nothing
                # known, every cell becomes ordinary.
                self.known = {}
            else:
                self.known = _known_cells(notebook)
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, index):
        meta = cell.setdefault("metadata", {})
        tags = meta.get("tags")
        if isinstance(tags, list):
            kept = [t for t in tags if isinstance(t, str) and t not in EXECUTION_TAGS]
            meta["tags"] = kept
        elif "tags" in meta:
            del meta["tags"]
        if "nbgrader" not in meta:
            return cell, resources
        raw = meta["nbgrader"]
        grade_id = raw.get("grade_id") if isinstance(raw, dict) else None
        rebuilt = self.known.get(grade_id) if isinstance(grade_id, str) else None
        if rebuilt is None:
            self.log.warning("cell %d: nbgrader metadata naming %r, a cell the gradebook does "
                             "not know, removed", index, grade_id)
            del meta["nbgrader"]
            return cell, resources
        if raw != rebuilt:
            self.log.warning("cell %d (%s): nbgrader metadata restored from the gradebook",
                             index, grade_id)
        meta["nbgrader"] = NotebookNode(rebuilt)
        meta.pop("tags", None)
        return cell, resources


def _known_cells(notebook) -> dict[str, dict]:
    """``grade_id -> nbgrader metadata`` of every cell the gradebook holds for ``notebook``."""
    grades = {c.name: float(c.max_score) for c in notebook.grade_cells}
    solutions = {c.name for c in notebook.solution_cells}
    tasks = {c.name: float(c.max_score) for c in notebook.task_cells}
    out = {}
    for source in notebook.source_cells:
        name = source.name
        meta = {"grade": name in grades, "grade_id": name, "locked": bool(source.locked),
                "schema_version": 3, "solution": name in solutions, "task": name in tasks,
                "cell_type": source.cell_type}
        if name in grades or name in tasks:
            meta["points"] = grades.get(name, tasks.get(name))
        if source.checksum:
            meta["checksum"] = source.checksum
        out[name] = meta
    return out


class DropEmptyNbgraderMetadata(NbGraderPreprocessor):
    """Remove ``nbgrader`` cell metadata that has no ``grade_id``.

    nbgrader 0.9's ``DeduplicateIds`` empties the metadata of all but the last copy of a
    duplicated cell (a student split or copied a test cell), and ``OverwriteCells`` then fails
    on the empty dict (``KeyError: 'grade_id'``) when it re-adds missing cells. Without the
    metadata the copy is an ordinary cell, and the cell keeping the id is restored and graded.
    """

    def preprocess_cell(self, cell, resources, index):
        meta = cell.metadata.get("nbgrader")
        if meta is not None and not meta.get("grade_id"):
            del cell.metadata["nbgrader"]
        return cell, resources


# =====================================================================================
# Feedback and display safety (issue 16, part B): what a student sees in feedback and what
# an instructor's browser renders. Separate from the metadata sanitising above.
# =====================================================================================
import re  # noqa: E402  (this block's own imports, kept with it)

import bleach  # noqa: E402  (maintained HTML sanitiser; nbconvert depends on it already)
from bleach.css_sanitizer import CSSSanitizer  # noqa: E402
from nbgrader.preprocessors import ClearHiddenTests  # noqa: E402
from nbgrader.utils import is_grade  # noqa: E402

#: HTML a notebook output or Markdown cell may keep: text, tables, lists, headings,
#: images. No script, style, iframe, object, form or SVG; no event-handler attribute.
SAFE_TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "caption", "code", "col", "colgroup", "dd", "del",
    "details", "div", "dl", "dt", "em", "figcaption", "figure", "h1", "h2", "h3", "h4", "h5",
    "h6", "hr", "i", "img", "ins", "kbd", "li", "ol", "p", "pre", "s", "samp", "small", "span",
    "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
    "u", "ul", "var",
})
_SAFE_ATTRIBUTES = frozenset({"class", "id", "title", "align", "colspan", "rowspan", "border",
                              "style", "alt", "width", "height"})
_CSS = CSSSanitizer()  # bleach's default allow-list of CSS properties


def _allowed_attribute(tag: str, name: str, value: str) -> bool:
    """Attributes kept by :func:`clean_html`: a link's ``href`` and an image's ``src``,
    whose protocols bleach then checks (http, https, mailto: no ``javascript:`` and no
    ``data:``, which could carry a page of its own), and the plain ones in
    ``_SAFE_ATTRIBUTES``."""
    if name in _SAFE_ATTRIBUTES:
        return True
    return (tag, name) in {("a", "href"), ("img", "src")}


_CLEANER = bleach.Cleaner(tags=SAFE_TAGS, attributes=_allowed_attribute,
                          protocols={"http", "https", "mailto"}, strip=True,
                          strip_comments=True, css_sanitizer=_CSS)


def clean_html(html: str | bytes) -> str:
    """``html`` with everything that could run in a browser removed: ``<script>``, event
    handlers (``onerror=``), ``javascript:`` URLs, SVG, iframes, forms, styles.

    Used as nbconvert's ``clean_html`` template filter (the one ``sanitize_html`` applies;
    nbconvert's own escapes headings, paragraphs and table headers) and on outputs.

    Example:
        >>> clean_html('<b>ok</b><img src=x onerror="alert(1)"><script>alert(2)</script>')
        '<b>ok</b><img>alert(2)'
    """
    text = html.decode() if isinstance(html, bytes) else str(html)
    return _CLEANER.clean(text)


#: Output types shown as they are (no markup a browser would run).
SAFE_OUTPUT_KEYS = frozenset({"text/plain", "text/latex", "image/png", "image/jpeg",
                              "image/gif", "application/json"})
#: Output types that are HTML, kept after :func:`clean_html`.
HTML_OUTPUT_KEYS = frozenset({"text/html", "text/markdown"})
_TAG = re.compile(r"<[A-Za-z!/?]")


class SanitizeOutputs(NbGraderPreprocessor):
    """Make a notebook safe to render: HTML and Markdown outputs and Markdown cells go
    through :func:`clean_html`; every other output type (JavaScript, SVG, widget views and
    anything unknown) is dropped, and so is the widget state (an HTML widget's value is
    markup too). Runs at the end of autograding, so the autograded notebook that the
    formgrader and the feedback render holds nothing executable.

    Example (``grading/nbgrader_config.py``)::

        c.Autograde.autograde_preprocessors = [GradingExecute, ..., SanitizeOutputs]
    """

    def preprocess(self, nb, resources):
        nb.metadata.pop("widgets", None)
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type in ("markdown", "raw") and _TAG.search(cell.source or ""):
            cell.source = clean_html(cell.source)
        if cell.cell_type == "markdown" and "attachments" in cell:
            for attachment in cell.attachments.values():
                for key in [k for k in attachment if k not in SAFE_OUTPUT_KEYS]:
                    del attachment[key]
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data is None:
                continue
            for key in list(data):
                if key in HTML_OUTPUT_KEYS:
                    data[key] = clean_html(data[key])
                elif key not in SAFE_OUTPUT_KEYS:
                    del data[key]
            if not data:
                data["text/plain"] = "[output removed by the grader: it was not plain text, " \
                                     "HTML or an image]"
        return cell, resources


_TRACE_NOTE = "[traceback lines hidden: they quote the hidden tests]"


class HideHiddenTests(ClearHiddenTests):
    """For feedback: remove every ``### BEGIN HIDDEN TESTS`` .. ``### END HIDDEN TESTS``
    region from the cells (the autograded notebook has the gradebook's test cells, hidden
    parts included; nbgrader 0.9's GenerateFeedback shows them), and cut a test cell's error
    tracebacks down to the error's name and message, since a traceback quotes the failing
    line of the test. A student still sees why a test failed, never its code.

    A region without its end (a student's own cell with only the opening marker) is cut
    from that marker to the end of the cell instead of failing the feedback.

    Example (``grading/nbgrader_config.py``)::

        c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, ...]
    """

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" or self.begin_test_delimeter in (cell.source or ""):
            try:
                removed = self._remove_hidden_test_region(cell)
            except RuntimeError:  # nested or unterminated markers
                lines = cell.source.split("\n")
                first = next(i for i, line in enumerate(lines)
                             if self.begin_test_delimeter in line)
                cell.source, removed = "\n".join(lines[:first]), True
            if (removed or is_grade(cell)) and cell.cell_type == "code":
                for output in cell.get("outputs", []):
                    if output.get("output_type") == "error":
                        output["traceback"] = [
                            _TRACE_NOTE,
                            f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
        return cell, resources
