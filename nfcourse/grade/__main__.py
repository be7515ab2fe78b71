"""``python -m nfcourse.grade ...`` is ``nfcourse grade ...``."""

import sys

from nfcourse.grade.cli import main

sys.exit(main())
