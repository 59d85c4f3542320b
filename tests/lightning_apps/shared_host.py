"""Data-parallel processes that offload alike, as ``torchrun`` starts them: gloo on the CPU,
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` in the environment, and
``apply_offload(..., process_group=torch.distributed.group.WORLD)`` on every rank.

    python shared_host.py SCENARIO OUT_DIR [WORLD_SIZE]

Scenarios:

- ``checks``: the same model on every rank, offloaded with prefetch and with UVA, shared and
  with ``share_host_memory=false``; then plans that differ between ranks, and a rank that is
  refused before the meeting. Each rank writes ``OUT_DIR/rank<R>.pt``: outputs, stats, the
  inodes of the shared mappings (``/proc/self/maps``), and the errors raised.
- ``cuda``: the same on one GPU (both processes compute on ``cuda:0``): every process has
  registered its own mapping of the shared memory (``cudaPointerGetAttributes``), and UVA's
  zero-copy views and prefetch's copies read it.
- ``two-nodes``: four processes on this machine, told that ranks 0 and 1 run on one node and
  2 and 3 on another: each node shares one copy, the nodes none.
- ``kill-setup`` / ``kill-run``: rank 1 kills itself with SIGKILL while the shared memory is
  being handed over (it has been created and filled, not yet mapped by rank 1), or after the
  offload is applied, during a forward. The launcher then ends the other ranks.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hydra_offload import OffloadError, apply_offload
from hydra_offload.runtime import shared

PREFETCH = {"prefetch": {"offload_group_size": 2}, "layers": "layers"}
UVA = {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["layers"]}}


class Stack(nn.Module):
    def __init__(self, width: int = 256, depth: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def frozen_stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().requires_grad_(False).eval()


def shared_inodes() -> list[int]:
    """The inodes of this process's mappings of the offload's shared memory."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:hydra-offload" in line:
                found.append(int(line.split()[4]))
    return sorted(set(found))


def attempt(results: dict, key: str, run) -> None:
    try:
        results[key] = {"value": run(), "error": None}
    except Exception as err:
        results[key] = {"value": None, "error": f"{type(err).__name__}: {err}"}


def checks(rank: int, out: Path) -> dict:
    results: dict = {"pid": os.getpid()}
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    for name, config in (("prefetch", PREFETCH), ("uva", UVA)):
        for share in (True, False):
            model = frozen_stack()
            expected = model(x)
            with apply_offload(
                model, {**config, "share_host_memory": share}, process_group=dist.group.WORLD
            ) as handle:
                stats = handle.stats
                results[f"{name}-{share}"] = {
                    "equal": torch.equal(model(x), expected),
                    "shared_by": handle.shared_by,
                    "host_bytes_shared": stats.host_bytes_shared,
                    "offloaded_bytes": stats.offloaded_bytes,
                    "stats_shared_by": stats.shared_by,
                    "inodes": shared_inodes(),
                }
            results[f"{name}-{share}"]["after_remove"] = torch.equal(model(x), expected)
            results[f"{name}-{share}"]["inodes_after"] = shared_inodes()

    def differing_plans() -> None:
        model = frozen_stack()
        config = PREFETCH if rank == 0 else {**PREFETCH, "prefetch": {"offload_group_size": 3}}
        apply_offload(model, config, process_group=dist.group.WORLD)

    attempt(results, "differing", differing_plans)

    def one_rank_refused() -> None:
        model = frozen_stack()
        if rank == 1:  # a parameter the offload cannot take, in an offloaded layer
            model.layers[1].weight = nn.Parameter(torch.eye(256).to_sparse(), False)
        apply_offload(model, PREFETCH, process_group=dist.group.WORLD)

    attempt(results, "refused", one_rank_refused)
    # After both refusals every rank is still in step: a last offload works.
    model = frozen_stack()
    with apply_offload(model, PREFETCH, process_group=dist.group.WORLD) as handle:
        results["after_refusals"] = handle.shared_by
    return results


def on_cuda(rank: int) -> dict:
    from hydra_offload.runtime import cudart

    runtime = cudart.get_runtime()
    results: dict = {}
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)).cuda()
    for name, config in (("prefetch", PREFETCH), ("uva", UVA)):
        model = frozen_stack().cuda()
        expected = model(x)
        with apply_offload(model, config, process_group=dist.group.WORLD) as handle:
            stats = handle.stats
            registered = []
            for entry in handle._installed.staged.params:
                for host in entry.hosts:
                    err, attributes = runtime.pointer_attributes(host.data_ptr())
                    registered.append(err == 0 and attributes.type == cudart.MEMORY_HOST)
            results[name] = {
                "equal": torch.equal(model(x), expected),
                "shared_by": handle.shared_by,
                "host_bytes_shared": stats.host_bytes_shared,
                "pinned_is_all": stats.host_bytes_pinned == stats.host_bytes,
                "registered": all(registered) and bool(registered),
                "inodes": shared_inodes(),
            }
        results[name]["after_remove"] = torch.equal(model(x), expected)
    return results


def two_nodes(rank: int) -> dict:
    # Ranks 0, 1 on one node, 2, 3 on another (one machine, told otherwise).
    shared._node_key = lambda: f"node{rank // 2}"  # type: ignore[assignment]
    model = frozen_stack()
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    with apply_offload(model, PREFETCH, process_group=dist.group.WORLD) as handle:
        return {
            "equal": torch.equal(model(x), expected),
            "shared_by": handle.shared_by,
            "inodes": shared_inodes(),
        }


def kill(rank: int, when: str) -> None:
    model = frozen_stack()
    if rank == 1 and when == "setup":
        original = shared.SharedSegment.attach

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        shared.SharedSegment.attach = die  # type: ignore[method-assign]
    handle = apply_offload(model, PREFETCH, process_group=dist.group.WORLD)
    if rank == 1 and when == "run":
        model(torch.randn(2, 256))
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 1 never comes: the launcher ends this one
    handle.remove()


def worker(index: int, scenario: str, out: str, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index),
        WORLD_SIZE=str(world), LOCAL_RANK=str(index), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=index, world_size=world)
    try:
        if scenario in ("checks", "cuda", "two-nodes"):
            run = {"checks": lambda: checks(index, Path(out)), "cuda": lambda: on_cuda(index),
                   "two-nodes": lambda: two_nodes(index)}[scenario]  # fmt: skip
            torch.save(run(), Path(out) / f"rank{index}.pt")
        else:
            kill(index, scenario.removeprefix("kill-"))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if scenario in ("checks", "cuda", "two-nodes"):
            dist.barrier()
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    scenario, out = sys.argv[1], sys.argv[2]
    world = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    Path(out).mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(
            worker, args=(scenario, out, world, free_port()), nprocs=world, start_method="spawn"
        )
    except mp.ProcessExitedException as err:  # the kill scenarios end here
        print(f"a process exited: {err}")
        sys.exit(3)
    except OffloadError as err:
        print(f"refused: {err}")
        sys.exit(4)
