"""``python -m cdalign <command> ...`` and ``accelerate launch -m cdalign <command> ...``: the
``cdalign`` console command (:mod:`cdalign.cli`)."""

import sys

from cdalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
