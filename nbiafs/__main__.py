"""Run nbiafs as ``python -m nbiafs``."""

import sys

from .cli import main

sys.exit(main())
