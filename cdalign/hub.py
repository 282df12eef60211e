"""``python -m cdalign.hub push|pull ...``: the documented command line of
:mod:`cdalign.publishing.hub`, kept at its short name. Nothing inside cdalign imports this."""

import sys

from cdalign.publishing.hub import main, pull, push_output_dir  # noqa: F401

__all__ = ["main", "pull", "push_output_dir"]

if __name__ == "__main__":
    sys.exit(main())
