"""``python -m peerlm``: the ``peerlm`` command, also what ``torchrun -m peerlm`` starts on every rank."""

import sys

from peerlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
