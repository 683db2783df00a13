"""`python -m scripts.cluster_support` (what `scripts/cluster` runs)."""

import sys

from .cli import main

sys.exit(main())
