"""Warnings that point at the user's line, not at the library frames that raised them."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from types import FrameType

__all__ = ["warn_at_caller"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Libraries whose frames sit between the user's call and the check that warns.
_PASS_THROUGH = ("pydantic", "omegaconf", "hydra", "lightning", "pytorch_lightning", "torch")


def _skipped_dirs() -> tuple[str, ...]:
    dirs = [_PACKAGE_DIR]
    for name in _PASS_THROUGH:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(module.__file__) + os.sep)
    return tuple(dirs)


# The standard library's own frames at the bottom of a process or thread that a launcher
# started (multiprocessing's bootstrap, threading, runpy): no user's line is below them.
_STDLIB_DIR = os.path.dirname(os.path.abspath(os.__file__)) + os.sep


def warn_at_caller(
    message: str,
    category: type[Warning],
    fallback: Callable[[str], None] | None = None,
) -> None:
    """Issue ``message`` attributed to the first frame outside hydra-offload and the
    libraries between it and the user's code (pydantic, OmegaConf, Hydra, Lightning, torch:
    e.g. a Trainer's hooks or a module's forward calling into the offload).

    In a process or thread a launcher started (Lightning's ``ddp_spawn``), no frame of the
    user's is on the stack: with ``fallback``, the message goes to ``fallback`` instead (a
    log line), rather than to a warning that points at the launcher's bootstrap.
    """
    skipped = _skipped_dirs()
    frame = sys._getframe(1)  # the caller, which is stacklevel 2 for warnings.warn here
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame = frame.f_back
        level += 1
    if fallback is not None and _launched_from(frame):
        fallback(message)
        return
    warnings.warn(message, category, stacklevel=level)


def _launched_from(frame: FrameType | None) -> bool:
    """Whether ``frame`` and every frame below it belong to the standard library (a
    launcher's bootstrap), or there is no frame left."""
    while frame is not None:
        if not frame.f_code.co_filename.startswith(_STDLIB_DIR):
            return False
        frame = frame.f_back
    return True
