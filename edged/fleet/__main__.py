"""``python -m edged.fleet``: the ``edged-fleet`` command."""

import sys

from edged.fleet.cli import main

sys.exit(main())
