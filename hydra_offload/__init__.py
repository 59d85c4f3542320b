"""hydra-offload: keep part of a model's weights in host memory, by configuration alone.

The public API:

- :class:`OffloadConfig` (with :class:`UVAOffloadConfig`, :class:`PrefetchOffloadConfig`):
  the validated, immutable settings; :class:`OffloadConfigWarning` for conflicting ones.
- :func:`to_offload_config`: a Hydra ``DictConfig`` / ``dict`` to an ``OffloadConfig``, with
  errors (:class:`OffloadConfigError`) that name the dotted key.
- :func:`plan_offload` -> :class:`OffloadPlan`: what would move where, computed without
  touching weights (works on ``meta`` models).
- :func:`apply_offload` -> :class:`OffloadHandle`: the plan carried out on a live model by
  the UVA or prefetch backend; ``handle.stats`` (:class:`OffloadStats`), ``handle.remove()``.
- :func:`get_offload_handle`: the handle of the offload active on a model, or ``None``.
- :class:`OffloadCallback`: the same for a Lightning ``Trainer``, applied at setup and removed
  at the end of each stage.

Names that need torch are imported on first use, so the Hydra plugin (which imports this
package to register the config schema) does not load torch into every Hydra app.

Example:
    >>> import hydra_offload
    >>> hydra_offload.OffloadConfig().resolved_backend
    'none'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hydra_offload.config import (
    OffloadBackend,
    OffloadConfig,
    OffloadConfigError,
    OffloadConfigWarning,
    PrefetchOffloadConfig,
    UVAOffloadConfig,
    to_offload_config,
)

if TYPE_CHECKING:
    from hydra_offload.integrations.lightning import OffloadCallback
    from hydra_offload.offload import (
        OffloadError,
        OffloadHandle,
        apply_offload,
        get_offload_handle,
    )
    from hydra_offload.plan import OffloadPlan, OffloadPlanWarning, plan_offload
    from hydra_offload.stacks import LayerStackError
    from hydra_offload.stats import OffloadStats

__version__ = "0.1.0"

_LAZY = {
    "OffloadCallback": "hydra_offload.integrations.lightning",
    "OffloadError": "hydra_offload.offload",
    "OffloadHandle": "hydra_offload.offload",
    "OffloadStats": "hydra_offload.stats",
    "apply_offload": "hydra_offload.offload",
    "available_host_bytes": "hydra_offload.offload",
    "get_offload_handle": "hydra_offload.offload",
    "OffloadPlan": "hydra_offload.plan",
    "OffloadPlanWarning": "hydra_offload.plan",
    "plan_offload": "hydra_offload.plan",
    "LayerStackError": "hydra_offload.stacks",
}

__all__ = [
    "LayerStackError",
    "OffloadCallback",
    "OffloadError",
    "OffloadHandle",
    "OffloadStats",
    "apply_offload",
    "available_host_bytes",
    "get_offload_handle",
    "OffloadBackend",
    "OffloadConfig",
    "OffloadConfigError",
    "OffloadConfigWarning",
    "OffloadPlan",
    "OffloadPlanWarning",
    "PrefetchOffloadConfig",
    "UVAOffloadConfig",
    "__version__",
    "plan_offload",
    "to_offload_config",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hydra_offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
