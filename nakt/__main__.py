"""``python -m nakt VERB ...``: the same command as ``nakt`` (and what ``torchrun ... -m nakt`` runs)."""

import sys

from nakt.cli import main

if __name__ == "__main__":
    sys.exit(main())
