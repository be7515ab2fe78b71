"""nfcourse: the companion package of a course on normalizing flows.

Students write flow layers in the notebooks; this package supplies everything around them:
reference layers (:mod:`nfcourse.flows`), self-checks (:mod:`nfcourse.checks`), data
(:mod:`nfcourse.data`), training (:mod:`nfcourse.train`), pictures (:mod:`nfcourse.viz`),
continuous flows (:mod:`nfcourse.cnf`) and grading (:mod:`nfcourse.grade`).
"""

from nfcourse.config import fast_mode

__version__ = "0.1.0"
__all__ = ["fast_mode", "__version__"]
