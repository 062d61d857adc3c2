"""``python -m geosample`` is the ``geosample`` command."""
import sys

from .cli import main

sys.exit(main())
