"""`python -m engine_core ...` is `pp-engine ...` (same exit codes)."""

import sys

from engine_core.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
