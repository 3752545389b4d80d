"""``python -m isda`` (also ``torchrun -m isda train ...``)."""

import sys

from .cli import main

sys.exit(main())
