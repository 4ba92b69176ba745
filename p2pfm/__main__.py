"""``python -m p2pfm`` is the same as the ``p2pfm`` command."""

import sys

from p2pfm.cli import main

sys.exit(main())
