"""``python -m purecomp COMMAND ...``: the subcommands registered by purecomp's method packages."""

import sys

import purecomp  # noqa: F401  (imports the built-in method packages, which register their commands)
from purecomp.commands import main

if __name__ == "__main__":
    sys.exit(main())
