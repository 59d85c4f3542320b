"""Every example in the public docstrings runs and prints what it claims."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "hydra_offload",
    "hydra_offload.config",
    "hydra_offload.hydra",
    "hydra_offload._applied",
    "hydra_offload.lightning",
    "hydra_offload.measure",
    "hydra_offload.models.lightning",
    "hydra_offload.models.decoder",
    "hydra_offload.offload",
    "hydra_offload.plan",
    "hydra_offload.runtime.device",
    "hydra_offload.runtime.grads",
    "hydra_offload.runtime.host",
    "hydra_offload.runtime.params",
    "hydra_offload.runtime.pool",
    "hydra_offload.runtime.simulated",
    "hydra_offload.runtime.timing",
    "hydra_offload.selection",
    "hydra_offload.stacks",
    "hydra_offload.suggest",
    "hydra_offload.sweep",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
