"""``python -m hnd`` runs the command line."""

import sys

from hnd.cli import main

sys.exit(main())
