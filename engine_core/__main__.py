"""`python -m engine_core ...` is `pp-engine ...`."""

from engine_core.entrypoints.cli import main

if __name__ == "__main__":
    main()
