"""Data-parallel training of offloaded weights: a node's host memory and step time, against DDP.

    python benchmarks/ddp_train_bench.py                      # 1, 2, 4 ranks; 128 MiB; UVA
    python benchmarks/ddp_train_bench.py --backend prefetch   # prefetch, one layer a slot
    python benchmarks/ddp_train_bench.py --ranks 2 --mib 512 --steps 8 --options ddp offload

On this machine, for every rank count of ``--ranks`` and every option, a fresh set of
processes starts as ``torchrun`` would start them (gloo on the CPU; ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` in the
environment; ``OMP_NUM_THREADS=1``), so that no measurement inherits what an earlier one left
in a process. Every option trains the same model on the same data for the same steps:

- ``ddp``: plain ``DistributedDataParallel``, no offload: every rank holds the weights, their
  gradients (and DDP's gradient buckets) and AdamW's state;
- ``offload``: ``apply_offload(model, config, process_group=WORLD)`` on every rank (the layers
  offloaded: UVA, or prefetch with ``--backend prefetch``), then ``DistributedDataParallel``
  over the rest (the head), the offloaded parameters' names in
  ``model._ddp_params_and_buffers_to_ignore``. The node's ranks share one host copy of the
  offloaded weights; their gradients are averaged over the ranks, and each rank copies to
  host memory and steps (with the same AdamW over all ``model.parameters()``) only the
  offloaded parameters it owns, keeping AdamW's state for those only;
- ``fsdp-cpu-offload``: FSDP2 (``fully_shard`` on each layer, on the head and on the model,
  over ``init_device_mesh("cpu", (ranks,))``) with ``offload_policy=CPUOffloadPolicy(...)``.
  Each rank first tries the default ``CPUOffloadPolicy()`` on a one-layer probe: it pins host
  memory, which needs an accelerator, and raises on a CPU-only machine (the json and the
  Markdown record its one-line error); the run then uses ``CPUOffloadPolicy(pin_memory=False)``.
  Where that raises too, the option is recorded as "does not run on the CPU: <error>", with
  no figures;
- ``fsdp``: FSDP2 the same way without an offload policy (parameters, gradients and AdamW's
  state sharded over the ranks);
- two references, for the rounding of the weights only (their memory and times are in the
  json, not in the table): ``ddp-per-param``, the offload's arithmetic without the offload
  (DDP over the head; after backward each layer's gradient is all-reduced on its own, times
  ``1 / ranks`` then summed, as the offload does), and ``ddp-buckets``, plain DDP with
  ``bucket_cap_mb=1`` instead of its default 25 (the same sums, in another order).

The model: ``--layers`` trainable ``nn.Linear(width, width)`` layers, ``--mib`` MiB of fp32
weights and biases in all (by default 32 layers of 1024 x 1024, 128 MiB), tanh between them,
and a small trainable head ``Linear(width, 8)``. Every rank builds it from the same seed; each
rank draws its own batches (a generator seeded by its rank: 8 x width inputs, 8 x 8 targets,
a new batch every step, the same in every option); MSE loss; ``AdamW(lr=1e-3)``; ``--steps``
steps. Each step runs between two barriers: its time is the wall-clock time from the first
barrier to the second (the node's step, the slowest rank's); the first step is a warm-up
(AdamW allocates its state), the figure is the median of the others. After each step, all
ranks together (between two more barriers: a rank's Pss counts a shared page only once the
rank has touched it, so readings taken at different moments would not add up) read their
proportional set size (``Pss`` of ``/proc/self/smaps_rollup``: a page that ``n`` processes map
counts ``1/n`` in each). The gradients are still held at that moment (``zero_grad`` comes at
the start of the next step); FSDP's unsharded parameters, held only inside its forward and
backward, are not.

Per (ranks, option): the node's host memory, the SUM of the ranks' Pss after a step (pages the
ranks share count once for the node; the largest such sum over the steps); the saving against
``ddp``; the median step time (and every step's time); the setup time (``apply_offload`` and
the wrapping); what each rank holds of the training state (bytes of gradients and of AdamW
state, the offloaded parameters it owns); and the correctness check: after the steps rank 0
saves its weights (the offload removed, FSDP's parameters gathered) and the launcher compares
them with the ``ddp`` run's of the same rank count (the largest absolute difference; the
offload's should be within 1e-6), and the offload's with ``ddp-per-param``'s. With one or two
ranks every run's weights equal DDP's exactly (a sum of two floats is the same in either
order). With more, a sum over the ranks rounds by the order gloo adds their gradients in,
which depends on how they are packed (DDP's 25 MiB buckets; one parameter at a time), and
AdamW's normalized step carries such differences of small gradients into the weights: the
Markdown then says how far the references differ, so that the offload's difference can be
read against DDP's own. The ``ddp`` run also records how far it moved the weights (equal
weights must not mean that nothing trained).

The launcher process is not counted; it imports torch too, so the ranks' Pss of the library
pages is a share of them, alike in every option of a rank count. Pss counts the pages a
process has resident, also those its allocator keeps after tensors are freed: on the CPU,
FSDP2 gathers each layer's weights and makes its full gradients in host memory every step,
and frees them. With more ranks than cores (4 ranks on 2 cores) the ranks take turns on the
cores: step times then measure the node, not a rank.

A rank that dies after it has finished (its figures gathered, its process group destroyed)
does not void the run: FSDP2 over gloo now and then aborts a rank as its interpreter exits
("terminate called without an active exception"; here 1 of 40 launches of a bare FSDP2
script, without this library); the row then carries an ``exit_note`` and the Markdown says so. A
rank that dies earlier fails the benchmark (or, for the FSDP options, records the option as
not running).

Writes ``benchmarks/results/ddp_train-cpu.json`` (every figure, every rank's readings, the
machine, torch version, date and command), ``.md`` (the table) and ``.png`` (the node's Pss and
the step time against the rank count, one line per option) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import node_bench
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from node_bench import MIB
from rich.table import Table
from torch import nn

from hydra_offload import apply_offload

MAIN_OPTIONS = ("ddp", "offload", "fsdp-cpu-offload", "fsdp")
# Runs that measure only the rounding of the weights (their memory and time are in the json).
REFERENCES = ("ddp-per-param", "ddp-buckets")
OPTIONS = MAIN_OPTIONS + REFERENCES
OPTION_TITLES = {
    "ddp": "DDP",
    "offload": "offload",
    "fsdp-cpu-offload": "FSDP2 + CPU offload",
    "fsdp": "FSDP2",
    "ddp-per-param": "DDP + per-parameter all-reduce",
    "ddp-buckets": "DDP, 1 MiB buckets",
}
BACKENDS = {
    # Every layer's weights in host memory, read in place.
    "uva": {"uva": {"cpu_offload_gb": 100, "cpu_offload_params": ["layers"]}},
    # Every layer offloaded, one layer's slots on the compute device (here the CPU).
    "prefetch": {"prefetch": {"offload_group_size": 1}, "layers": "layers"},
}
SEED = 0
BATCH = 8
TOLERANCE = 1e-6
COLLECTIVE_TIMEOUT = dt.timedelta(seconds=300)  # a hung rank ends the launch, not the bench


def one_line(err: BaseException) -> str:
    """``err`` as one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (an FSDP ``DTensor``'s shard; else ``tensor``)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors (AdamW's moments; not its scalar step counts)."""
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]


def fsdp_policy_error() -> str | None:
    """The one-line error of FSDP2 with the default ``CPUOffloadPolicy()`` on a one-layer
    probe (``None`` where it works); needs the process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    try:
        fully_shard(nn.Linear(4, 4), mesh=mesh, offload_policy=CPUOffloadPolicy())
    except Exception as err:
        return one_line(err)
    return None


Wrapped = tuple[nn.Module, Any, dict[str, Any], Callable[[], None] | None]


def wrap(option: str, model: node_bench.LinearStack, backend: str) -> Wrapped:
    """The module to train (``model`` wrapped for ``option``), the offload's handle (or
    ``None``), notes for the report, and what to run after each backward (or ``None``)."""
    notes: dict[str, Any] = {}
    if option == "ddp":
        return nn.parallel.DistributedDataParallel(model), None, notes, None
    if option == "ddp-buckets":
        return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1), None, notes, None
    if option == "offload":
        handle = apply_offload(model, BACKENDS[backend], process_group=dist.group.WORLD)
        # DDP syncs the rest (the head); the offload averages the offloaded gradients.
        model._ddp_params_and_buffers_to_ignore = list(handle.plan.offloaded_params)
        return nn.parallel.DistributedDataParallel(model), handle, notes, None
    if option == "ddp-per-param":
        # The offload's arithmetic without the offload: DDP syncs the head; each layer's
        # gradient is averaged on its own (times 1 / ranks, then summed over the ranks).
        layers = {n: p for n, p in model.named_parameters() if n.startswith("layers.")}
        model._ddp_params_and_buffers_to_ignore = list(layers)

        def average() -> None:
            for param in layers.values():
                if param.grad is not None:
                    param.grad.mul_(1.0 / dist.get_world_size())
                    dist.all_reduce(param.grad)

        return nn.parallel.DistributedDataParallel(model), None, notes, average
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if option == "fsdp-cpu-offload":
        notes["default_policy_error"] = fsdp_policy_error()
        pin = notes["default_policy_error"] is None
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=pin)
        notes["policy"] = f"CPUOffloadPolicy(pin_memory={pin})"
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model.head, **kwargs)
    fully_shard(model, **kwargs)
    return model, None, notes, None


def final_weights(model: nn.Module, handle: Any) -> dict[str, torch.Tensor]:
    """Every parameter's trained value, in ordinary CPU memory (every rank calls it: FSDP
    gathers its shards)."""
    if handle is not None:
        handle.remove(device=torch.device("cpu"))
    weights = {}
    for name, param in model.named_parameters():
        full = getattr(param, "full_tensor", None)
        value = full() if callable(full) else param
        weights[name] = value.detach().to("cpu", copy=True)
    return weights


def measure(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank's figures for one option (the process group is up)."""
    torch.set_num_threads(1)
    option = spec["option"]
    result: dict[str, Any] = {
        "rank": rank,
        "pid": os.getpid(),
        "pss_bare_bytes": node_bench.pss_bytes(),
    }
    torch.manual_seed(SEED)
    model = node_bench.LinearStack(spec["width"], spec["depth"])
    result["pss_built_bytes"] = node_bench.pss_bytes()
    dist.barrier()
    start = time.perf_counter()
    try:
        trained, handle, notes, after_backward = wrap(option, model, spec["backend"])
    except Exception as err:
        if not option.startswith("fsdp"):
            raise  # the offload or DDP failing is a bug to see, not a figure
        # Every rank builds the same FSDP wrapping and fails alike, before any collective.
        result["error"] = one_line(err)
        return result
    result["setup_s"] = time.perf_counter() - start
    result.update(notes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(SEED + 1 + rank)
    times, readings, losses = [], [], []
    for _ in range(spec["steps"]):
        x = torch.randn(BATCH, spec["width"], generator=generator)
        y = torch.randn(BATCH, 8, generator=generator)
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(trained(x), y)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
        # Every rank reads after the same step: a page counts in a rank's Pss once the rank
        # has touched it, so the ranks' readings add up only when taken together.
        readings.append(node_bench.pss_bytes())
        dist.barrier()
        losses.append(loss.item())
    params = list(model.parameters())
    result.update(
        step_s=times,
        losses=losses,
        pss_readings_bytes=readings,
        pss_max_bytes=max(readings),
        grad_bytes=_nbytes([p.grad for p in params if p.grad is not None]),
        optimizer_state_bytes=_nbytes(state_tensors(optimizer)),
        params_with_optimizer_state=len(optimizer.state),
    )
    if handle is not None:
        partition = handle.partition
        owned = [p for p in params if partition is not None and partition.owns(p)]
        result.update(
            node_bench.offload_figures(handle), owned_params=len(owned), owned_bytes=_nbytes(owned)
        )
        dist.barrier()  # every rank has read its memory before any lets go of the weights
    weights = final_weights(model, handle)
    if rank == 0:
        torch.save(weights, spec["weights_path"])
    return result


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two sets of weights of the same names."""
    if a.keys() != b.keys():
        raise ValueError(f"different parameters: {sorted(a.keys() ^ b.keys())}")
    return max((a[name] - b[name]).abs().max().item() for name in a)


def summarize(
    ranks: int, option: str, per_rank: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    row: dict[str, Any] = {"ranks": ranks, "option": option, "launch_wall_s": wall}
    errors = {r["error"] for r in per_rank if "error" in r}
    if errors:
        row["error"] = f"does not run on the CPU: {' / '.join(sorted(errors))}"
        row["per_rank"] = per_rank
        return row
    # The node's step: every rank timed the same span between two barriers; the slowest.
    steps = [max(step) for step in zip(*(r["step_s"] for r in per_rank), strict=True)]
    row.update(
        # The node after each step (the ranks read together), the largest of those, and what
        # the training added to the built model, in the same processes.
        node_bench.node_pss(per_rank),
        step_s=steps,
        step_s_median=statistics.median(steps[1:]),  # the first step is the warm-up
        setup_s_max=max(r["setup_s"] for r in per_rank),
        node_grad_bytes=sum(r["grad_bytes"] for r in per_rank),
        node_optimizer_state_bytes=sum(r["optimizer_state_bytes"] for r in per_rank),
    )
    for key in ("policy", "default_policy_error", "shared_by", "host_bytes_shared"):
        if key in per_rank[0]:
            row[key] = node_bench.same([r.get(key) for r in per_rank])
    if option == "offload":
        row["owned_params"] = [r["owned_params"] for r in per_rank]
    row["per_rank"] = per_rank
    return row


def finish_rows(
    rows: list[dict[str, Any]], weights: dict[tuple[int, str], Path], initial: dict[str, Any]
) -> None:
    """Per rank count: the saving against ``ddp``; each run's largest weight difference from
    the ``ddp`` run (and the offload's from ``ddp-per-param``, its arithmetic without the
    offload); how far the ``ddp`` run moved the weights from ``initial`` (so that equal
    weights say the runs trained alike, not that nothing trained)."""
    ran = {(row["ranks"], row["option"]): row for row in rows if "error" not in row}

    def difference(row: dict[str, Any], other: str) -> float | None:
        if (row["ranks"], other) not in ran:
            return None
        return max_difference(
            torch.load(weights[(row["ranks"], other)]),
            torch.load(weights[(row["ranks"], row["option"])]),
        )

    for row in rows:
        base = ran.get((row["ranks"], "ddp"))
        row["saved_vs_ddp_bytes"] = row["max_abs_diff_vs_ddp"] = None
        if "error" in row:
            continue
        row["max_abs_diff_vs_ddp"] = difference(row, "ddp")
        if row["option"] == "ddp":
            row["max_abs_update"] = max_difference(
                initial, torch.load(weights[(row["ranks"], "ddp")])
            )
        if row["option"] == "offload":
            row["max_abs_diff_vs_per_param"] = difference(row, "ddp-per-param")
            if row["max_abs_diff_vs_ddp"] is not None:
                row["weights_equal_ddp"] = row["max_abs_diff_vs_ddp"] <= TOLERANCE
        if base is not None:
            row["saved_vs_ddp_bytes"] = base["node_pss_bytes"] - row["node_pss_bytes"]
            row["saved_vs_ddp_fraction"] = row["saved_vs_ddp_bytes"] / base["node_pss_bytes"]


def _by_ranks(report: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    table: dict[int, dict[str, dict[str, Any]]] = {}
    for row in report["rows"]:
        table.setdefault(row["ranks"], {})[row["option"]] = row
    return table


def _pss(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "does not run"
    return f"{row['node_pss_bytes'] / MIB:.1f}"


def _saved(row: dict[str, Any] | None) -> str:
    if row is None or row.get("saved_vs_ddp_bytes") is None:
        return "-"
    return f"{row['saved_vs_ddp_bytes'] / MIB:.1f} ({100 * row['saved_vs_ddp_fraction']:.0f} %)"


def _step(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return "n/a" if "error" in row else f"{row['step_s_median']:.3f}"


def _diff(row: dict[str, Any] | None, key: str = "max_abs_diff_vs_ddp") -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "n/a"
    value = row.get(key)
    return "-" if value is None else f"{value:.1e}"


def columns(options: list[str]) -> list[tuple[str, Any]]:
    """The table's columns for the options that ran: one row per rank count. The
    references appear in the weight differences only."""
    main = [o for o in options if o in MAIN_OPTIONS]
    cols: list[tuple[str, Any]] = [("ranks", lambda rows, ranks: str(ranks))]
    for option in main:
        cols.append((f"{OPTION_TITLES[option]} node Pss MiB",
                     lambda rows, ranks, o=option: _pss(rows.get(o))))  # fmt: skip
        if option == "offload" and "ddp" in options:
            cols.append(("offload saved vs DDP MiB",
                         lambda rows, ranks: _saved(rows.get("offload"))))  # fmt: skip
    cols.append((
        "step s " + " / ".join(OPTION_TITLES[o] for o in main),
        lambda rows, ranks: " / ".join(_step(rows.get(o)) for o in main),
    ))  # fmt: skip
    others = [o for o in options if o != "ddp"]
    if "ddp" in options and others:
        cols.append((
            "max weight diff vs DDP: " + " / ".join(OPTION_TITLES[o] for o in others),
            lambda rows, ranks: " / ".join(_diff(rows.get(o)) for o in others),
        ))  # fmt: skip
    if "offload" in options and "ddp-per-param" in options:
        cols.append((
            f"max weight diff offload vs {OPTION_TITLES['ddp-per-param']}",
            lambda rows, ranks: _diff(rows.get("offload"), "max_abs_diff_vs_per_param"),
        ))  # fmt: skip
    return cols


def describe(report: dict[str, Any]) -> str:
    model = report["model"]
    return (
        f"{model['depth']} trainable Linear({model['width']}, {model['width']}) layers "
        f"({model['layers_bytes'] / MIB:.1f} MiB fp32; offloaded with {report['backend']} in "
        f"`offload`), tanh between, a head Linear({model['width']}, 8); MSE, "
        f"AdamW(lr=1e-3), {report['steps']} steps of a {BATCH} x {model['width']} batch per "
        "rank"
    )


def _rounding(ranks: int, rows: dict[str, dict[str, Any]]) -> str | None:
    """Why the offload's weights differ from DDP's by more than the tolerance, from the
    references' figures (``None`` where they do not)."""
    offload = rows.get("offload", {})
    difference = offload.get("max_abs_diff_vs_ddp")
    if difference is None or difference <= TOLERANCE:
        return None
    line = (
        f"{ranks} ranks: the offload's weights differ from DDP's by {difference:.1e}, more "
        f"than {TOLERANCE:.0e}"
    )
    per_param = rows.get("ddp-per-param", {}).get("max_abs_diff_vs_ddp")
    if per_param is not None:
        line += (
            f"; {OPTION_TITLES['ddp-per-param']} (the offload's arithmetic without the "
            f"offload) differs from DDP by {per_param:.1e}, and the offload from it by "
            f"{offload['max_abs_diff_vs_per_param']:.1e}"
        )
    buckets = rows.get("ddp-buckets", {}).get("max_abs_diff_vs_ddp")
    if buckets is not None:
        line += f"; DDP with 1 MiB buckets differs from DDP by {buckets:.1e}"
    return line + (
        ". A sum of more than two floats rounds by the order of its terms, and the order "
        "gloo adds the ranks' gradients in depends on how they are packed (DDP's buckets, or "
        "one parameter at a time); AdamW's normalized step then carries such differences of "
        "small gradients into the weights"
    )


def notes(report: dict[str, Any]) -> list[str]:
    """What the FSDP rows ran with, what did not run, what the runs hold of the training
    state, and the rounding of the weights."""
    lines = []
    fsdp = [r for r in report["rows"] if r["option"] == "fsdp-cpu-offload"]
    errors = sorted({r["default_policy_error"] for r in fsdp if r.get("default_policy_error")})
    policies = sorted({r["policy"] for r in fsdp if "policy" in r})
    if errors:
        lines.append(f"FSDP2 with the default `CPUOffloadPolicy()` (pinned host memory) does "
                     f"not run on the CPU: `{' / '.join(errors)}`; the "
                     f"{OPTION_TITLES['fsdp-cpu-offload']} column is "
                     f"`{' / '.join(policies) or '-'}`.")  # fmt: skip
    for row in report["rows"]:
        if "exit_note" in row:
            lines.append(f"{row['ranks']} rank(s), {OPTION_TITLES[row['option']]}: "
                         f"{row['exit_note']}.")  # fmt: skip
        if "error" in row:
            lines.append(f"{row['ranks']} rank(s), {OPTION_TITLES[row['option']]}: "
                         f"{row['error']}.")  # fmt: skip
    held = []
    for option in (o for o in report["options"] if o in MAIN_OPTIONS):
        rows = [r for r in report["rows"] if r["option"] == option and "error" not in r]
        if rows:
            figures = " / ".join(
                f"{(r['node_grad_bytes'] + r['node_optimizer_state_bytes']) / MIB:.0f}"
                for r in rows
            )
            held.append(f"{OPTION_TITLES[option]} {figures}")
    if held:
        ranks = " / ".join(str(r) for r in sorted({r["ranks"] for r in report["rows"]}))
        lines.append(f"Gradients and AdamW state the node's ranks hold after a step (MiB; "
                     f"{ranks} ranks): {'; '.join(held)}.")  # fmt: skip
    updates = [r["max_abs_update"] for r in report["rows"] if "max_abs_update" in r]
    if updates:
        lines.append(f"The DDP runs moved the weights by up to {max(updates):.1e} from their "
                     "initial values (the largest absolute change).")  # fmt: skip
    for ranks, rows in _by_ranks(report).items():
        line = _rounding(ranks, rows)
        if line is not None:
            lines.append(line + ".")
    return lines


def markdown(report: dict[str, Any]) -> str:
    cols = columns(report["options"])
    table = _by_ranks(report)
    lines = [
        *node_bench.heading("Data-parallel training of offloaded weights", report),
        f"{describe(report)}. Each (ranks, option) in fresh processes (gloo on the CPU, "
        "`OMP_NUM_THREADS=1`). Node Pss: the sum over the ranks of their Pss, read together "
        "after each step (shared pages count once for the node); the largest over the steps. "
        "Step s: the median over the steps after the first of the time between the barriers "
        "around a step. Max weight diff: the largest absolute difference of rank 0's trained "
        "weights from the DDP run's; the references measure rounding only: "
        f"{OPTION_TITLES['ddp-per-param']} (DDP syncs the head, each layer's gradient is "
        "all-reduced on its own, times 1 / ranks then summed: the offload's arithmetic, "
        f"without the offload) and {OPTION_TITLES['ddp-buckets']} (DDP with "
        "`bucket_cap_mb=1` instead of 25: the same sums over the ranks, in another order).",
        "",
        "| " + " | ".join(title for title, _ in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for ranks, rows in table.items():
        lines.append("| " + " | ".join(cell(rows, ranks) for _, cell in cols) + " |")
    lines += ["", *(f"- {line}" for line in notes(report))]
    lines += ["", f"Total wall time {report['wall_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def rich_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Data-parallel training, {report['backend']} offload")
    cols = columns(report["options"])
    for title, _ in cols:
        table.add_column(title, justify="right")
    for ranks, rows in _by_ranks(report).items():
        table.add_row(*(cell(rows, ranks) for _, cell in cols))
    return table


def plot(report: dict[str, Any], path: Path) -> None:
    fig, (memory, step) = node_bench.subplots(1, 2, figsize=(11, 4.5))
    for option in (o for o in report["options"] if o in MAIN_OPTIONS):
        rows = [r for r in report["rows"] if r["option"] == option and "error" not in r]
        if not rows:
            continue
        ranks = [r["ranks"] for r in rows]
        label = OPTION_TITLES[option]
        memory.plot(ranks, [r["node_pss_bytes"] / MIB for r in rows], marker="o", label=label)
        step.plot(ranks, [r["step_s_median"] for r in rows], marker="o", label=label)
    for ax in (memory, step):
        node_bench.ranks_axis(ax, report)
    memory.set_ylabel(node_bench.NODE_PSS_LABEL)
    memory.set_title(f"{report['model']['layers_bytes'] / MIB:.0f} MiB of trainable layers, "
                     f"AdamW ({report['backend']})")  # fmt: skip
    step.set_ylabel("step time, median (s)")
    step.set_title(f"{report['machine']['processor']}, {report['machine']['cpus']} CPUs")
    node_bench.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    node_bench.add_arguments(
        parser,
        backends=BACKENDS,
        options=OPTIONS,
        ranks_help="rank counts, each a fresh set of processes per option (default: 1 2 4)",
        mib_help="MiB of trainable layers (default: 128)",
        layers_help="layers (default: 32)",
        options_help="which options to run (default: all; the last two are references)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="training steps per run, the first a warm-up (default: 5)",
    )
    args = parser.parse_args(argv)
    if min(args.ranks) < 1 or args.layers < 1 or args.mib <= 0:
        parser.error("--ranks, --layers and --mib must be positive")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a warm-up step and a timed one)")
    options = [option for option in OPTIONS if option in args.options]
    os.environ["OMP_NUM_THREADS"] = "1"  # the ranks share the cores
    width, depth, console = node_bench.begin(args, options)
    layers = node_bench.layer_bytes(width, depth)

    started = time.perf_counter()
    rows = []
    weights: dict[tuple[int, str], Path] = {}
    with tempfile.TemporaryDirectory(prefix="ddp_train_bench-") as tmp:
        for ranks in args.ranks:
            for option in options:
                weights[(ranks, option)] = Path(tmp) / f"weights-{ranks}-{option}.pt"
                spec = {"ranks": ranks, "option": option, "backend": args.backend,
                        "width": width, "depth": depth, "steps": args.steps,
                        "weights_path": str(weights[(ranks, option)])}  # fmt: skip
                try:
                    # Rank 0 leaves its trained weights at spec["weights_path"].
                    out = Path(tmp) / f"ranks-{ranks}-{option}.json"
                    per_rank, wall, exit_note = node_bench.launch(
                        measure, spec, out, COLLECTIVE_TIMEOUT
                    )
                except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
                    if not option.startswith("fsdp"):
                        raise  # the offload or DDP failing is a bug to see, not a figure
                    console.print(f"{ranks} rank(s), {option}: failed\n{err}")
                    rows.append({"ranks": ranks, "option": option,
                                 "error": f"does not run on the CPU: {one_line(err)}"})  # fmt: skip
                    continue
                rows.append(summarize(ranks, option, per_rank, wall))
                if exit_note is not None:
                    rows[-1]["exit_note"] = exit_note
                    console.print(f"{ranks} rank(s), {option}: {exit_note}")
                row = rows[-1]
                figure = row.get("error") or (
                    f"node Pss {row['node_pss_bytes'] / MIB:.1f} MiB, "
                    f"step {row['step_s_median']:.3f} s"
                )
                console.print(f"{ranks} rank(s), {option}: {figure} ({wall:.1f} s)")
        torch.manual_seed(SEED)
        initial = {
            n: p.detach() for n, p in node_bench.LinearStack(width, depth).named_parameters()
        }
        finish_rows(rows, weights, initial)
        del initial

    report: dict[str, Any] = {
        **node_bench.report_head("benchmarks/ddp_train_bench.py", argv),
        "backend": args.backend,
        "config": BACKENDS[args.backend],
        "options": options,
        "steps": args.steps,
        "batch": BATCH,
        "tolerance": TOLERANCE,
        "model": {
            "width": width,
            "depth": depth,
            "layers_bytes": layers,
            "head": f"Linear({width}, 8), trainable, not offloaded",
        },
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    console.print(rich_table(report))
    for line in notes(report):
        console.print(line)
    node_bench.write_outputs(report, args.out / "ddp_train-cpu", markdown, plot, console)
    return report


if __name__ == "__main__":
    main()
