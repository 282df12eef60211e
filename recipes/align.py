"""Constrained alignment of a diffusion model (cdalign, arXiv 2508.19104): ``cdalign align``
as a script, so that ``accelerate launch recipes/align.py ...`` keeps working.

    cdalign align                                                        # the same, installed
    accelerate launch recipes/align.py                                   # embedded tiny model, CPU, offline
    accelerate launch recipes/align.py --config recipes/sd15/multi_reward.yaml   # the paper's experiment (GPU)
    accelerate launch recipes/align.py --config tiny/policy_gradient --max_steps 5 --dual.kappa_i 0.1

Every YAML key is a field of ``cdalign.ConstrainedDDPOConfig`` (``--help`` lists them).
Without ``--config`` the packaged recipe ``tiny/multi_reward``
(``cdalign/recipes_data/tiny/multi_reward.yaml``) runs. The command is
:mod:`cdalign.alignment.command`."""

import sys

from cdalign.alignment.command import DEFAULT_RECIPE, main

__all__ = ["DEFAULT_RECIPE", "main"]

if __name__ == "__main__":
    sys.exit(main())
