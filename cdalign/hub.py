"""``python -m cdalign.hub push|pull|publish-embedded ...``: the documented command line of
:mod:`cdalign.publishing.hub` (where its functions and ``HubPushError`` live), kept at its
short name. Nothing inside cdalign imports this."""

import sys

from cdalign.publishing.hub import main

if __name__ == "__main__":
    sys.exit(main())
