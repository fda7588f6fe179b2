"""``python -m pipelines COMMAND``: see :mod:`pipelines.cli`."""

import sys

from pipelines.cli import main

sys.exit(main())
