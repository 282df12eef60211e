"""Constrained composition of diffusion models (cdalign, arXiv 2508.19104, METHOD.md §2):
``cdalign compose`` as a script, so that ``accelerate launch recipes/compose.py ...`` keeps working.

    cdalign compose                                            # the same, installed
    accelerate launch recipes/compose.py                       # default: tiny adapters, CPU, offline, minutes
    accelerate launch recipes/compose.py --config recipes/compose/sd15_reward_adapters.yaml   # the paper (GPU)
    accelerate launch recipes/compose.py --config recipes/compose/sd15_concepts.yaml
    accelerate launch recipes/compose.py --config compose/tiny_mixture                        # OR (mixture)
    python recipes/compose.py --config <recipe.yaml> --dual.steps 10 --dual.lr 0.5

``composition: and`` recipes are fields of ``cdalign.composition.ComposeConfig``,
``composition: or`` recipes of ``cdalign.composition.MixtureConfig`` (``--help`` lists them).
The command is :mod:`cdalign.composition.command`."""

import sys

from cdalign.composition.command import DEFAULT_RECIPE, main

__all__ = ["DEFAULT_RECIPE", "main"]

if __name__ == "__main__":
    sys.exit(main())
