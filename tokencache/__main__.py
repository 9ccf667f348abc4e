"""``python -m tokencache``: the same command line as ``tokencache``."""
import sys

from tokencache.cli import main

sys.exit(main())
