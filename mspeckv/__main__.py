import sys

from .cli import main

if __name__ == "__main__":  # spawned tensor-parallel ranks import this module again: they must not rerun the CLI
    sys.exit(main())
