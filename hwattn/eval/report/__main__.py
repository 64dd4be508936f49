"""`python -m hwattn.eval.report --study DIR`: the command of `hwattn.eval.report.main`."""

import sys

from hwattn.eval.report import main

sys.exit(main())
