"""The base-model reward statistics shipped with cdalign: ``base_statistics.json`` beside this
module holds, for the packaged tiny recipes (``tiny/multi_reward``, ``tiny/multi_reward_floor``,
``tiny/flow_multi_reward``, ``tiny/flow_multi_reward_floor``, ``tiny/policy_gradient``, and the
component adapters that ``cdalign compose`` trains, ``compose/tiny_adapter_*`` and
``compose/tiny_flow_adapter_*``) on the
embedded models (``cdalign/tiny-shapes-sd``, ``cdalign/tiny-shapes-sd3``), each reward's mean and
std on base-model samples with the full key the statistics cache stores
(:mod:`cdalign.runs.normalization_cache`). A run reads them behind its own cache
(:class:`~cdalign.runs.normalization_cache.ShippedStatistics`): an exact key match only, so a
changed reward, other weights, another seed or another process count computes them as before.

Regenerate the file after changing a reward's code, the embedded models, the prompts or those
recipes: ``python -m cdalign.alignment.shipped_statistics --refresh`` (statistics only, no training)."""

from __future__ import annotations

from pathlib import Path

from cdalign.runs.normalization_cache import ShippedStatistics

SHIPPED_STATISTICS_FILE = Path(__file__).with_name("base_statistics.json")
REGENERATE_COMMAND = "python -m cdalign.alignment.shipped_statistics --refresh"
# The packaged recipes whose statistics ship (tiny/policy_gradient_served scores on a server: not shipped).
SHIPPED_RECIPES = ("tiny/multi_reward", "tiny/multi_reward_floor", "tiny/flow_multi_reward",
                   "tiny/flow_multi_reward_floor", "tiny/policy_gradient",
                   "compose/tiny_adapter_brightness", "compose/tiny_adapter_colorfulness", "compose/tiny_adapter_contrast",
                   "compose/tiny_flow_adapter_brightness", "compose/tiny_flow_adapter_colorfulness")


def shipped_statistics() -> ShippedStatistics:
    """The shipped statistics (read lazily, on their first lookup)."""
    return ShippedStatistics(SHIPPED_STATISTICS_FILE)
