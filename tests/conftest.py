"""Shared test settings: CUDA-only tests are skipped on machines without a CUDA device; the
``run_on`` fixture runs a test on the CPU runtime and on the simulated device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from hydra_offload.runtime.simulated import SimulatedDevice


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", "simulated"])
def run_on(request: pytest.FixtureRequest) -> Iterator[SimulatedDevice | None]:
    """Runs the test twice: on the CPU runtime (copies synchronous), and on the simulated
    device (copies complete later on other threads; missing waits and host/device mix-ups
    raise). Yields the simulated device, or ``None``."""
    if request.param == "cpu":
        yield None
        return
    with SimulatedDevice() as simulated:
        yield simulated


@pytest.fixture
def simulated() -> Iterator[SimulatedDevice]:
    """The simulated device (see :mod:`hydra_offload.runtime.simulated`)."""
    with SimulatedDevice() as device:
        yield device


@pytest.fixture
def hydra_job(tmp_path):
    """A Hydra job in this process, its output directory ``tmp_path / "job"``, as
    ``hydra.main`` sets it up for the task function."""
    from hydra import compose, initialize
    from hydra.core.hydra_config import HydraConfig

    with initialize(version_base="1.3", config_path=None):
        cfg = compose(overrides=[], return_hydra_config=True)
    output_dir = tmp_path / "job"
    output_dir.mkdir()
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    yield output_dir
    HydraConfig.instance().cfg = None
