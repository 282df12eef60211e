"""Old import path of the alignment config, kept for code written against cdalign 0.1
(``from cdalign.config import ConstrainedDDPOConfig``). New code imports from
:mod:`cdalign.alignment.config` (or ``cdalign``). Nothing inside cdalign imports this."""

from cdalign.alignment.config import *  # noqa: F401,F403
from cdalign.alignment.config import __all__  # noqa: F401
