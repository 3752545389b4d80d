"""``python -m benchmarks.gpu_check``."""

import sys

from . import main

sys.exit(main())
