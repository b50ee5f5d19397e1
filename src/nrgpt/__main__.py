"""``python -m nrgpt``: the ``nrgpt`` command."""

import sys

from .cli import main

sys.exit(main())
