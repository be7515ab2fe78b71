"""nbgrader preprocessors the course's configuration adds to autograding."""

from __future__ import annotations

from nbgrader.preprocessors import NbGraderPreprocessor


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
