"""`python -m snapagentd` runs the daemon, as the `snapagentd` console script does."""

import sys

from .cli import main

sys.exit(main())
