"""Faults injected into a job through its config, for tests of how the job reports them.

Importable as ``faults`` with this folder on ``PYTHONPATH``, e.g. as a callbacks entry of
``run.py``: ``'+callbacks.oom={_target_:faults.OutOfMemoryAt,value:${...},at:4}'``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback


class OutOfMemoryAt(Callback):
    """Raises ``torch.OutOfMemoryError`` at the first batch when ``value == at``: a device too
    small for the settings a trial proposes, on a machine where nothing runs out."""

    def __init__(self, value: Any, at: Any) -> None:
        self.value = value
        self.at = at

    def _check(self, *args: Any) -> None:
        if self.value == self.at:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {self.at})"
            )

    on_train_batch_start = _check
    on_predict_batch_start = _check
