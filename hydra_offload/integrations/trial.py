"""Failed trials: settings that cannot run end their trial of a study, not the study.

A sweeper that searches (Hydra's Optuna, Ax or Nevergrad sweepers) proposes the ``offload``
settings itself, and some of its proposals cannot run: a group setting the config rules
refuse, a layer stack the model does not have, not enough device memory. Each such trial
should be recorded as failed while the study goes on. hydra-optuna-sweeper (1.3) does that for
a job whose return value ``float()`` refuses, and ends the study for a job that raises (unless
``hydra.sweeper.max_failure_rate`` allows it). So:

- :class:`InfeasibleTrial` is the value such a trial returns;
- :func:`infeasible_reason` tells whether an exception says the settings cannot run, and why,
  in one line.

The ``offload`` group's job callback
(:class:`~hydra_offload.integrations.hydra_callback.OffloadJobCallback`) uses both: in a trial
of a searching sweeper whose task raised such an error, it reports the error in one line,
records it in the job's summary and makes the trial return an :class:`InfeasibleTrial`. An
app needs no code of its own for it. ``run.py``'s job returns one itself.

This module imports neither torch nor Lightning; it recognizes their errors only when they
are loaded (an error of a module never imported cannot have been raised).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

from hydra_offload.config import OffloadConfigError
from hydra_offload.errors import OffloadError

__all__ = ["InfeasibleTrial", "infeasible_reason"]


@dataclass(frozen=True)
class InfeasibleTrial:
    """What a trial returns instead of its objective when its settings cannot run.

    It is not a number on purpose. hydra-optuna-sweeper (1.3) records a trial whose return
    value ``float()`` refuses as failed, logs why, and goes on with the study. The
    alternatives end the study: an exception does unless ``hydra.sweeper.max_failure_rate``
    allows it, and ``nan`` makes the sweeper's own bookkeeping raise; ``inf`` would be kept as
    a completed trial with a real value.

    Example:
        >>> trial = InfeasibleTrial("out of memory")
        >>> str(trial)
        'infeasible: out of memory'
        >>> float(trial)
        Traceback (most recent call last):
        ...
        ValueError: infeasible: out of memory
    """

    reason: str

    def __str__(self) -> str:
        return f"infeasible: {self.reason}"

    def __float__(self) -> float:
        raise ValueError(str(self))


def infeasible_reason(error: BaseException) -> str | None:
    """Why ``error`` (or an exception it was raised from) says the settings cannot run, or
    ``None`` when it says something else (a bug, an interrupted job).

    Settings cannot run when validation refuses them (``OffloadConfigError``, also when
    ``hydra.utils.instantiate`` wrapped it), when the offload cannot be applied to the model
    (``OffloadError``, ``LayerStackError``), or when the device runs out of memory
    (``torch.OutOfMemoryError``).

    Example:
        >>> from hydra_offload import OffloadError
        >>> try:
        ...     try:
        ...         raise OffloadError("offload_params selects nothing")
        ...     except OffloadError as err:
        ...         raise RuntimeError("Error in call to target") from err
        ... except RuntimeError as wrapped:
        ...     print(infeasible_reason(wrapped))
        offload_params selects nothing
        >>> print(infeasible_reason(KeyError("a bug")))
        None
    """
    kinds: list[type[BaseException]] = [OffloadConfigError, OffloadError]
    stacks = sys.modules.get("hydra_offload.stacks")
    if stacks is not None:
        kinds.append(stacks.LayerStackError)
    torch = sys.modules.get("torch")
    memory = torch.OutOfMemoryError if torch is not None else None
    for err in _chain(error):
        if memory is not None and isinstance(err, memory):
            first = (str(err).strip().splitlines() or [""])[0]
            return "out of memory: " + first if first else "out of memory"
        if isinstance(err, tuple(kinds)):
            return str(err)
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or during, each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
