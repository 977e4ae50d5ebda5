"""``python -m loadtest.benchmarks``: the serving benchmark (see ``serving.py``)."""

import sys

from loadtest.benchmarks.serving import main

sys.exit(main())
