"""nfcourse: the companion package of a course on normalizing flows.

Students write flow layers in the notebooks; this package supplies everything around them:
reference layers (:mod:`nfcourse.flows`), self-checks (:mod:`nfcourse.checks`), data
(:mod:`nfcourse.data`), training (:mod:`nfcourse.train`), pictures (:mod:`nfcourse.viz`),
continuous flows (:mod:`nfcourse.cnf`) and grading (:mod:`nfcourse.grade`).

While a lesson is graded its kernel sees an edition of this package without that lesson's
reference answers; reaching one raises :class:`ExerciseRemoved` (an ``ImportError``) naming
the exercise. Installed on a student's own machine, the package is complete.
"""

from nfcourse.config import fast_mode
from nfcourse.removed import ExerciseRemoved

__version__ = "0.1.0"
__all__ = ["ExerciseRemoved", "fast_mode", "__version__"]
