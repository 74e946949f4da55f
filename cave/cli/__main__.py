"""`python -m cave.cli`: the same as the `cave` console script."""

import sys

from cave.cli.main import main

sys.exit(main())
