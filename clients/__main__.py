"""`python -m clients complete|bench ...`; see clients/cli.py."""

import sys

from .cli import main

sys.exit(main())
