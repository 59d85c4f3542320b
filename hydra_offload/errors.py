"""Exceptions shared by the runtime, the backends and the public API."""

from __future__ import annotations

__all__ = ["OffloadError"]


class OffloadError(RuntimeError):
    """The offload cannot be applied or used this way; the model was not modified."""
