"""The similarity report as one self-contained HTML page (see :mod:`.similarity`).

Everything from a submission is hostile text: cell sources, student ids (folder names) and
notes are HTML-escaped (quotes included) before they reach the page, and the page carries a
Content-Security-Policy that forbids every script, so even a mistake here could not run one.

Example:
    >>> from nfcourse.grade.similarity import SimilarityReport
    >>> page = render_html(SimilarityReport("01_x", 0.6, [], [], [], {}))
    >>> "<script" in page
    False
"""

from __future__ import annotations

from html import escape

from nfcourse.grade.similarity import Match, SimilarityReport

__all__ = ["render_html", "highlight"]

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fff1f0; }
.note { color: #555; }
.pair { margin: 1.2em 0 2em; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.side h3 { font-size: 1em; margin: .2em 0; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 6px; margin: 0;
      font-size: 12px; white-space: pre-wrap; word-break: break-all;
      max-height: 36em; overflow: auto; }
mark { background: #ffd54f; }
.bar { display: inline-block; height: .7em; background: #d9534f; vertical-align: middle; }
"""

# No script may run, whatever the page holds; inline styles only, nothing loaded.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none'; " \
       "form-action 'none'"


def highlight(text: str, spans: tuple[tuple[int, int], ...]) -> str:
    """``text`` HTML-escaped, with the ``(start, end)`` ranges in ``<mark>``.

    copydetect's own ``highlight_overlap`` returns the text unescaped when nothing matched,
    so it is not used on hostile code.

    Example:
        >>> highlight("a<b>c", ((1, 4),))
        'a<mark>&lt;b&gt;</mark>c'
    """
    out, at = [], 0
    for start, end in sorted(spans):
        start, end = max(start, at), min(end, len(text))
        if end <= start:
            continue
        out.append(escape(text[at:start]))
        out.append("<mark>" + escape(text[start:end]) + "</mark>")
        at = end
    out.append(escape(text[at:]))
    return "".join(out)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _label(m: Match) -> str:
    return {"solution": "the solution", "reference": m.other.removeprefix("reference:")}.get(
        m.kind, m.other)


def _row(m: Match, index: int | None) -> str:
    name = escape(_label(m))
    if index is not None:
        name = f'<a href="#pair-{index}">{name}</a>'
    width = int(round(100 * m.score))
    return (f'<tr class="{"flagged" if m.flagged else ""}"><td>{escape(m.cell)}</td>'
            f"<td>{escape(m.student)}</td><td>{escape(m.kind)}</td><td>{name}</td>"
            f'<td class="num">{_pct(m.similarity)}</td>'
            f'<td class="num">{_pct(m.other_similarity)}</td>'
            f'<td><span class="bar" style="width:{width}px"></span></td></tr>')


_HEAD = ("<tr><th>cell</th><th>student</th><th>against</th><th>other</th>"
         "<th>of the student's code</th><th>of the other's</th><th></th></tr>")


def _pair(report: SimilarityReport, m: Match, index: int) -> str:
    left = report.texts.get((m.student, m.cell), "")
    owner = m.other if m.kind != "solution" else "solution"
    right = report.texts.get((owner, m.cell), "")
    return (f'<div class="pair" id="pair-{index}"><h2>{escape(m.cell)}: '
            f"{escape(m.student)} and {escape(_label(m))} "
            f"({_pct(m.similarity)} / {_pct(m.other_similarity)})</h2>"
            '<div class="side">'
            f"<div><h3>{escape(m.student)}</h3><pre>{highlight(left, m.spans)}</pre></div>"
            f"<div><h3>{escape(_label(m))}</h3><pre>{highlight(right, m.other_spans)}</pre>"
            "</div></div></div>")


def render_html(report: SimilarityReport, *, unflagged_rows: int = 200) -> str:
    """The whole page: the flagged pairs (table, then each side by side with the matched
    code highlighted), then the most similar unflagged pairs, then the notes."""
    flagged = report.flagged
    rest = [m for m in report.matches if not m.flagged][:unflagged_rows]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>Similarity: {escape(report.lesson)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Similarity of answer cells: {escape(report.lesson)}</h1>",
        '<p class="note">For plagiarism review only: this report is <b>never scored</b> and '
        "changes no grade. Each answer cell is compared with the solution, the package's "
        "reference code for the exercise and the same cell of every other submission "
        "(copydetect's winnowing over Python tokens with names, strings and comments "
        "normalised, the released stub removed). A share is the part of that side's code "
        "found in the other; pairs at or above "
        f"{_pct(report.threshold)} are listed first. High similarity is a reason to read "
        "the code, not a verdict: short answers to the same exercise look alike.</p>",
        f"<p>{len(report.students)} submissions, {len(report.cells)} answer cells, "
        f"{len(report.matches)} pairs compared, <b>{len(flagged)} to review</b>.</p>",
        f"<h2>To review ({len(flagged)})</h2>",
    ]
    if flagged:
        parts += ["<table>", _HEAD, *(_row(m, i) for i, m in enumerate(flagged)), "</table>"]
        parts += [_pair(report, m, i) for i, m in enumerate(flagged)]
    else:
        parts.append("<p>No pair reaches the threshold.</p>")
    parts.append(f"<h2>Below the threshold (the {len(rest)} most similar)</h2>")
    if rest:
        parts += ["<table>", _HEAD, *(_row(m, None) for m in rest), "</table>"]
    if report.notes:
        parts.append("<h2>Not compared</h2><ul>")
        parts += [f"<li>{escape(note)}</li>" for note in report.notes]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
