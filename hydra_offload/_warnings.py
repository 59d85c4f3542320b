"""Warnings that point at the user's line, not at the library frames that raised them."""

from __future__ import annotations

import os
import sys
import warnings

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


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """Issue ``message`` attributed to the first frame outside hydra-offload and the
    libraries between it and the user's code (pydantic, OmegaConf, Hydra, Lightning, torch:
    e.g. a Trainer's hooks or a module's forward calling into the offload)."""
    skipped = _skipped_dirs()
    frame = sys._getframe(1)  # the caller, which is stacklevel 2 for warnings.warn here
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
