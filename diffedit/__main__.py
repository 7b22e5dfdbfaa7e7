"""`python -m diffedit ...`: the command line (the same as the `diffedit` console script)."""

import sys

from diffedit.cli import main

sys.exit(main())
