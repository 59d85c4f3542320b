"""Tuning offload settings: predict step times, search settings, measure the machine.

- :mod:`~hydra_offload.tuning.simulate`: the step time of a prefetch plan, from per-layer
  compute times and the host-to-device bandwidth (the runtime's own ring schedule, simulated).
- :mod:`~hydra_offload.tuning.search`: :func:`suggest_prefetch`, the fastest prefetch settings
  that fit a device budget.
- :mod:`~hydra_offload.tuning.measure`: bandwidth, step times, copied bytes, resident memory.

Example:
    >>> from hydra_offload.tuning import simulate_prefetch, suggest_prefetch
    >>> callable(simulate_prefetch) and callable(suggest_prefetch)
    True
"""

from hydra_offload.tuning.search import Suggestion, suggest_prefetch
from hydra_offload.tuning.simulate import LayerSeconds, simulate_prefetch

__all__ = ["LayerSeconds", "Suggestion", "simulate_prefetch", "suggest_prefetch"]
