"""`python -m bitflux ...`: the bitflux command."""

import sys

from .cli import main

sys.exit(main())
