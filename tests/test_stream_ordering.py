"""Stream ordering and host/device memory, checked on a CPU with the simulated device.

First what the simulated device itself guarantees (``hydra_offload.runtime.simulated``):
copies on side streams complete later, unordered accesses and host/device mixes raise. Then
scenarios that exercise every wait and synchronization of the backends: each runs the same
steps with and without offload and compares bit for bit. Last, mutants: the package with one
wait (or one host synchronization) removed must fail those scenarios, and so must the package
with every ``wait_event`` / ``wait_stream`` removed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM
from hydra_offload.runtime.device import DeviceRuntime, runtime_for
from hydra_offload.runtime.simulated import SimulatedDevice, SimulatedDeviceError, SimulatedRuntime

CPU = torch.device("cpu")


def _load_mutation():
    # A helper module next to the tests (the suite imports test files by path).
    path = Path(__file__).with_name("mutation.py")
    spec = importlib.util.spec_from_file_location("mutation", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation"] = module
    spec.loader.exec_module(module)
    return module


mutation = _load_mutation()


def layout(n: int) -> list:
    return [((n,), (1,), torch.float32)]


# --------------------------------------------------------------------------------------------
# The simulated device
# --------------------------------------------------------------------------------------------


def test_the_simulated_runtime_serves_the_cpu_inside_the_block_only():
    with SimulatedDevice():
        assert isinstance(runtime_for(CPU), SimulatedRuntime)
        assert type(runtime_for(torch.device("meta"))) is DeviceRuntime
    assert type(runtime_for(CPU)) is DeviceRuntime


def test_a_copy_on_a_side_stream_completes_later_and_a_wait_orders_it():
    with SimulatedDevice(min_delay_ms=30, max_delay_ms=30, check=False):
        runtime = runtime_for(CPU)
        host = runtime.host_storage(layout(8)).tensors[0].fill_(1)
        side, dst = runtime.new_stream(), torch.zeros(8)
        runtime.copy(side, dst, host)
        assert dst.sum() == 0  # still under way
        runtime.current_stream().wait_event(side.record_event())
        assert dst.sum() == 8


def test_reading_what_a_side_stream_writes_without_waiting_raises():
    with SimulatedDevice():
        runtime = runtime_for(CPU)
        host = runtime.host_storage(layout(8)).tensors[0]
        side, dst = runtime.new_stream(), torch.zeros(8)
        side.wait_stream(runtime.current_stream())
        runtime.copy(side, dst, host)
        with pytest.raises(SimulatedDeviceError, match="reads device memory that side stream"):
            dst + 1
        runtime.current_stream().wait_event(side.record_event())
        dst + 1


def test_overwriting_what_compute_read_without_waiting_for_it_raises():
    with SimulatedDevice():
        runtime = runtime_for(CPU)
        compute = runtime.current_stream()
        host = runtime.host_storage(layout(8)).tensors[0]
        side, dst = runtime.new_stream(), torch.zeros(8)
        side.wait_stream(compute)
        runtime.copy(side, dst, host)
        compute.wait_event(side.record_event())
        dst.sum()  # compute reads the slot...
        with pytest.raises(SimulatedDeviceError, match="writes device memory that the compute"):
            runtime.copy(side, dst, host)  # ...and the copy does not wait for that
        side.wait_event(compute.record_event())
        runtime.copy(side, dst, host)


def test_a_copy_waits_for_the_allocation_of_its_destination():
    with SimulatedDevice():
        runtime = runtime_for(CPU)
        host = runtime.host_storage(layout(8)).tensors[0]
        side = runtime.new_stream()
        torch.ones(3) * 2  # the compute stream has done something
        dst = torch.empty(8)
        with pytest.raises(SimulatedDeviceError, match="the compute stream wrote"):
            runtime.copy(side, dst, host)


def test_the_host_reads_what_a_side_stream_wrote_only_after_synchronizing():
    with SimulatedDevice():
        runtime = runtime_for(CPU)
        host = runtime.host_storage(layout(8)).tensors[0]
        side = runtime.new_stream()
        grad = torch.ones(8) * 3  # computed on the device
        side.wait_stream(runtime.current_stream())
        runtime.copy(side, host, grad)
        with pytest.raises(SimulatedDeviceError, match="host operator"):
            host.sum()
        side.synchronize()
        assert host.sum() == 24


def test_an_operator_mixing_host_and_device_memory_raises_and_a_copy_does_not():
    with SimulatedDevice():
        runtime = runtime_for(CPU)
        host = runtime.host_storage(layout(4)).tensors[0].fill_(2)
        device = torch.ones(4)
        with pytest.raises(SimulatedDeviceError, match="mixes host and device memory"):
            host + device
        device.copy_(host)  # a copy between the two is what copies are for
        assert runtime.in_host_memory(host * 2)  # computed from host memory alone
        assert not runtime.in_host_memory(device * 2)


def test_foreach_operators_may_mix_lists_but_not_positions():
    with SimulatedDevice():
        runtime = runtime_for(CPU)
        host = runtime.host_storage(layout(4) * 2).tensors
        device = [torch.ones(4), torch.ones(4)]
        torch._foreach_add_([host[0], device[0]], [host[1], device[1]])
        with pytest.raises(SimulatedDeviceError, match="mixes host and device memory"):
            torch._foreach_add_([host[0], device[0]], [device[1], host[1]])


def test_an_asynchronous_copy_from_pageable_host_memory_raises():
    with SimulatedDevice():
        runtime = runtime_for(CPU)
        pageable = runtime.to_host(torch.ones(4))
        side = runtime.new_stream()
        side.wait_stream(runtime.current_stream())
        with pytest.raises(SimulatedDeviceError, match="not page-locked"):
            runtime.copy(side, torch.empty(4), pageable)


def test_timing_events_measure_how_long_the_compute_stream_waited():
    with SimulatedDevice(min_delay_ms=20, max_delay_ms=20, check=False):
        runtime = runtime_for(CPU)
        host = runtime.host_storage(layout(4)).tensors[0]
        side, compute = runtime.new_stream(), runtime.current_stream()
        start, end = runtime.timing_event(), runtime.timing_event()
        runtime.copy(side, torch.empty(4), host)
        start.record(compute)
        compute.wait_event(side.record_event())
        end.record(compute)
        end.synchronize()
        assert start.elapsed_time(end) >= 19


# --------------------------------------------------------------------------------------------
# Scenarios: every wait and synchronization of the backends is needed by one of them
# --------------------------------------------------------------------------------------------

SIZES = {"vocab_size": 64, "hidden_size": 32, "num_layers": 4, "num_heads": 4,
         "intermediate_size": 64}  # fmt: skip
PREFETCH = {"prefetch": {"offload_group_size": 1, "offload_prefetch_step": 2}}
UVA = {"uva": {"cpu_offload_gb": 1.0}}


def decoder() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(**SIZES)


def batches(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, SIZES["vocab_size"], (count, 2, 9), generator=generator)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def infer(model: nn.Module) -> list[torch.Tensor]:
    """Forwards without and with autograd recording."""
    model.eval()
    outputs = []
    for ids in batches(3):
        with torch.no_grad():
            outputs.append(model(ids))
        outputs.append(model(ids).detach())
    return outputs


def train(model: nn.Module, accumulate: int = 2, steps: int = 3) -> list[torch.Tensor]:
    """AdamW with gradient accumulation and clipping; returns losses and final weights."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches(steps * accumulate)
    out = []
    for step in range(steps):
        optimizer.zero_grad()
        for ids in data[step * accumulate : (step + 1) * accumulate]:
            loss = loss_of(model, ids) / accumulate
            loss.backward()
            out.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return out


def step_by_hand(model: nn.Module) -> list[torch.Tensor]:
    """A forward (whose last copies, for the next forward, may still be under way), then an
    optimizer step with gradients set by hand."""
    with torch.no_grad():
        model(batches(1)[0])
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return [model(batches(1)[0]).detach()]


def load_after_forward(model: nn.Module) -> list[torch.Tensor]:
    """A forward (whose last copies may still be under way), then new weights loaded, then a
    forward with them."""
    with torch.no_grad():
        model(batches(1)[0])
    torch.manual_seed(5)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return [model(batches(1)[0]).detach()]


SCENARIOS: dict[str, tuple[dict, bool | None, Callable[[nn.Module], list[torch.Tensor]]]] = {
    "prefetch-inference": (PREFETCH, None, infer),
    "prefetch-training": (PREFETCH, None, train),
    "prefetch-step-by-hand": (PREFETCH, None, step_by_hand),
    "prefetch-load": (PREFETCH, None, load_after_forward),
    "uva-copy-training": (UVA, False, train),
    "uva-copy-step-by-hand": (UVA, False, step_by_hand),
    "uva-copy-load": (UVA, False, load_after_forward),
    # In a process group (of one): gradients reduced, then copied; the step split.
    "prefetch-training-split": (PREFETCH, None, train),
    "uva-copy-training-split": (UVA, False, train),
}


@contextlib.contextmanager
def group_for(scenario: str) -> Iterator[Any]:
    """The process group a scenario offloads in: one of this process alone for the split
    scenarios, else none."""
    if not scenario.endswith("-split"):
        yield None
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=list(SCENARIOS))
def test_scenario_on_the_simulated_device_equals_the_run_without_offload(scenario):
    config, zero_copy, run = SCENARIOS[scenario]
    reference = decoder()
    expected = run(reference)
    model = decoder()
    with (
        group_for(scenario) as group,
        SimulatedDevice() as simulated,
        apply_offload(model, config, zero_copy=zero_copy, process_group=group) as handle,
    ):
        assert (handle.partition is not None) == (group is not None)
        got = run(model)
    assert simulated.checked_ops > 0
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------
# Mutants: without any one of them, a scenario fails
# --------------------------------------------------------------------------------------------

SIMULATOR = {"runtime/simulated.py"}
ORDERING = mutation.statements({"wait_event", "wait_stream"}, exclude=SIMULATOR)
# Before other processes of the node may write the shared weights (after a backward, under a
# partition): copies of this process that no gradient waited for (a layer loaded ahead whose
# backward then does not run) must be done. One process never sees another write, so no
# scenario here can miss it; the simulated device checks the hand-over all the same.
FOR_OTHER_PROCESSES = {"PrefetchOffload._backward_finished"}
HOST_SYNCS = [
    s
    for s in mutation.statements({"synchronize"}, exclude=SIMULATOR)
    if s.path.startswith(("backends/", "runtime/grads.py"))
    and not s.function.endswith(("remove", "_uninstall"))
    and s.function not in FOR_OTHER_PROCESSES
]
# Before memory is released (the simulated device fails a release that a stream may still
# access). Each alone is covered by another before the same release, or by a blocking copy
# in between; all of them together are needed.
RELEASE_SYNCS = [
    s
    for s in mutation.statements({"synchronize"}, exclude=SIMULATOR)
    if s.path.startswith(("backends/", "runtime/grads.py"))
    and s.function.endswith(("remove", "_uninstall"))
]
SCENARIO_RUN = ["test_stream_ordering.py", "-k", "test_scenario_on_the_simulated_device"]


def _run_all(mutants: dict[str, list[mutation.Statement]]) -> dict[str, Any]:
    """Each mutant's scenario run, several at once (each is its own process)."""

    def run(removed: list[mutation.Statement]) -> Any:
        with tempfile.TemporaryDirectory() as workdir:
            return mutation.run_mutant(removed, SCENARIO_RUN, Path(workdir))

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run, removed) for name, removed in mutants.items()}
        return {name: future.result() for name, future in futures.items()}


def _summary(result: Any) -> str:
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else result.stderr[-500:]


def test_the_mutants_cover_every_wait_of_the_backends():
    functions = {s.function for s in ORDERING}
    assert {"_Ring.load", "PrefetchOffload._install", "HostGradients._accumulated",
            "WaitTimer.wait"} <= functions  # fmt: skip
    assert {"HostGradients.finish", "PrefetchOffload._before_step",
            "PrefetchOffload._before_load"} <= {s.function for s in HOST_SYNCS}  # fmt: skip
    assert {"PrefetchOffload._uninstall", "UVAOffload.remove",
            "HostGradients.remove"} <= {s.function for s in RELEASE_SYNCS}  # fmt: skip
    assert "HostGradients._copy_reduced" in functions
    synchronizing = {s.function for s in mutation.statements({"synchronize"}, exclude=SIMULATOR)}
    assert synchronizing >= FOR_OTHER_PROCESSES  # what is left out is still there


@pytest.mark.slow
def test_without_any_one_wait_or_host_synchronization_a_scenario_fails():
    mutants = {
        "unmutated copy": [],
        "every wait_event and wait_stream removed": ORDERING,
        "every synchronization before a release removed": RELEASE_SYNCS,
        **{f"{s} removed": [s] for s in [*ORDERING, *HOST_SYNCS]},
    }
    results = _run_all(mutants)
    # The harness itself works: the unmutated copy of the package passes.
    baseline = results.pop("unmutated copy")
    assert baseline.returncode == 0, baseline.stdout[-3000:] + baseline.stderr[-2000:]
    survivors = {
        name: _summary(result)
        for name, result in results.items()
        if result.returncode != 1 or " failed" not in _summary(result)
    }
    assert survivors == {}
