"""Command line: ``isda shapes | train | eval | predict | export | demo | convert | convert labels``.

``parser.py`` reads the command line (every verb's options) and turns user errors into one line and exit
status 2; each verb's work is in its own module (``shapes.py``, ``train.py``, ``eval.py``, ``predict.py``,
``export.py``, ``demo.py``, ``convert.py``), sharing ``common.py``.
"""

from .common import UserError
from .parser import main

__all__ = ["UserError", "main"]
