"""`python -m cluster.cli`: the same as the `cave` console script."""

import sys

from cluster.cli.main import main

sys.exit(main())
