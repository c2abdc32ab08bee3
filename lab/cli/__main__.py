"""`python -m lab.cli ...` is the `lab` command (the launchers run it so)."""

import sys

from lab.cli import main

sys.exit(main())
