"""What the node benchmarks share: torchrun-style launch of fresh rank processes, readings, the
report's machine/date/command, argparse for rank counts and model size.

``shared_host_bench.py`` and ``ddp_train_bench.py`` measure what the data-parallel processes
of one node hold in host memory. For every (ranks, option), :func:`launch` starts a fresh set
of processes as ``torchrun`` would start them (gloo on the CPU; ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` in the
environment), so that no measurement inherits what an earlier one left in a process; each
runs the script's ``measure(rank, spec)`` and rank 0 gathers the figures
(``all_gather_object``). A rank reads its proportional set size (:func:`pss_bytes`); the
node's figure is the sum over its ranks (:func:`node_pss`). The model is a
:class:`LinearStack` of ``--layers`` square fp32 layers holding about ``--mib`` MiB
(:func:`shape_for`).

:func:`write_outputs` writes a report's json, Markdown and plot, and :func:`subplots` and
:func:`save_figure` make the plot; ``offload_bench.py`` uses these three too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import json
import math
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from torch import nn

from hydra_offload.runtime.host import proc_bytes

RESULTS = Path(__file__).parent / "results"
"""Where the node benchmarks write their results (``--out``)."""

MIB = 2**20
# One rank's figures for one option, the process group up: ``measure(rank, spec)``.
Measure = Callable[[int, dict[str, Any]], dict[str, Any]]
NODE_PSS_LABEL = "node host memory: sum of the ranks' Pss (MiB)"


class LinearStack(nn.Module):
    """``depth`` ``Linear(width, width)`` layers with tanh between, and a head
    ``Linear(width, 8)``."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def shape_for(mib: float, depth: int) -> tuple[int, int]:
    """``(width, depth)``: ``depth`` square fp32 layers holding about ``mib`` MiB."""
    width = max(8, round(math.sqrt(mib * MIB / 4 / depth)))
    return width, depth


def layer_bytes(width: int, depth: int) -> int:
    """The layers' bytes: every layer's fp32 weight and bias."""
    return depth * (width * width + width) * 4


def pss_bytes() -> int:
    """This process's proportional set size (``Pss`` of ``/proc/self/smaps_rollup``)."""
    pss = proc_bytes("/proc/self/smaps_rollup", "Pss")
    if pss is None:
        raise RuntimeError("no Pss in /proc/self/smaps_rollup")
    return pss


def offload_figures(handle: Any) -> dict[str, Any]:
    """What the offload's ``handle.stats`` says of this rank's host memory."""
    stats = handle.stats
    return {
        "offloaded_bytes": stats.offloaded_bytes,
        "host_bytes": stats.host_bytes,
        "host_bytes_shared": stats.host_bytes_shared,
        "shared_by": stats.shared_by,
        "pool_bytes": stats.pool_bytes,
    }


def worker(
    index: int,
    measure: Measure,
    spec: dict[str, Any],
    port: int,
    out: str,
    timeout: dt.timedelta | None,
) -> None:
    """Rank ``index`` of ``spec["ranks"]``: the environment ``torchrun`` would give it, the
    process group (gloo; ``timeout`` for its collectives, torch's default where ``None``),
    ``measure``; rank 0 writes every rank's figures to ``out``. Then the rank marks itself
    through (see :func:`launch`)."""
    faulthandler.enable()  # a rank that aborts says where
    world = spec["ranks"]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index),
        WORLD_SIZE=str(world), LOCAL_RANK=str(index), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=index, world_size=world, timeout=timeout)
    try:
        mine = measure(index, spec)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        if index == 0:
            Path(out).write_text(json.dumps(gathered))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _done(out, index).touch()  # this rank is through: whatever happens at its exit is after


def _done(out: str | Path, index: int) -> Path:
    return Path(out).with_name(f"{Path(out).stem}-done-{index}")


def free_port() -> int:
    """A TCP port free on the loopback interface now, for the ranks to meet at."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    measure: Measure, spec: dict[str, Any], out: Path, timeout: dt.timedelta | None = None
) -> tuple[list[dict[str, Any]], float, str | None]:
    """Start ``spec["ranks"]`` fresh processes, each running ``measure`` (see :func:`worker`);
    their figures (rank 0 leaves them at ``out``), the launch's wall seconds, and what went
    wrong at a rank's exit after it was through, if anything.

    A rank that dies after it finished the run (every figure written, its process group
    destroyed: torch's FSDP2 over gloo now and then aborts a rank as the interpreter exits,
    "terminate called without an active exception") does not void the figures: the note
    says which rank and how. One that dies before raises."""
    start = time.perf_counter()
    note = None
    try:
        mp.start_processes(
            worker, args=(measure, spec, free_port(), str(out), timeout), nprocs=spec["ranks"],
            start_method="spawn",
        )  # fmt: skip
    except mp.ProcessExitedException as err:
        if not (out.exists() and _done(out, err.error_index).exists()):
            raise
        note = (
            f"rank {err.error_index} ended with {err.signal_name or err.exit_code} at its exit, "
            "after it had finished the run (its figures are complete)"
        )
    return json.loads(out.read_text()), time.perf_counter() - start, note


def same(values: list[Any]) -> Any:
    """The value every rank reported, or the list when they differ."""
    return values[0] if all(v == values[0] for v in values) else values


def node_pss(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The node's Pss, the sum of its ranks' (read by all ranks together): after each reading,
    the largest of those, once the model was built, and what the run added to that."""
    readings = [r["pss_readings_bytes"] for r in per_rank]
    node = [sum(reading) for reading in zip(*readings, strict=True)]
    built = sum(r["pss_built_bytes"] for r in per_rank)
    return {
        "node_pss_readings_bytes": node,
        "node_pss_bytes": max(node),
        "node_pss_built_bytes": built,
        # What the run added to the built model, in the same processes (their start-up noise,
        # a few MiB a process, cancels out).
        "node_pss_change_bytes": max(node) - built,
    }


def add_arguments(
    parser: argparse.ArgumentParser,
    *,
    backends: Iterable[str],
    options: Sequence[str],
    ranks_help: str,
    mib_help: str,
    layers_help: str,
    options_help: str,
) -> None:
    """``--ranks`` (default 1 2 4), ``--mib`` (128), ``--layers`` (32), ``--backend`` (one of
    ``backends``, default ``uva``), ``--options`` (some of ``options``, default all) and
    ``--out`` (default :data:`RESULTS`)."""
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help=ranks_help)
    parser.add_argument("--mib", type=float, default=128.0, help=mib_help)
    parser.add_argument("--layers", type=int, default=32, help=layers_help)
    parser.add_argument("--backend", choices=sorted(backends), default="uva")
    parser.add_argument(
        "--options", nargs="+", choices=options, default=list(options), help=options_help
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")


def begin(args: argparse.Namespace, options: list[str]) -> tuple[int, int, Console]:
    """The model's ``(width, depth)`` for ``--mib`` and ``--layers``, and the console, on which
    it says what is to run."""
    width, depth = shape_for(args.mib, args.layers)
    console = Console(width=200) if not sys.stdout.isatty() else Console()
    console.print(
        f"{depth} layers of {width} x {width} ({layer_bytes(width, depth) / MIB:.1f} MiB), "
        f"{args.backend}, ranks {args.ranks}, options {options}"
    )
    return width, depth, console


def machine() -> dict[str, Any]:
    """The processor, the system, the CPU count and the memory of this machine."""
    memory = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "processor": platform.processor() or platform.machine() or "cpu",
        "system": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
    }


def report_head(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The report's first keys: the date, the command (``python <script>`` and its
    arguments), the machine, torch's and Python's versions."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def heading(title: str, report: dict[str, Any]) -> list[str]:
    """The Markdown's first lines: ``title`` with the processor and its CPUs, and when, with
    what and how the report was made."""
    machine_ = report["machine"]
    return [
        f"# {title}: {machine_['processor']}, {machine_['cpus']} CPUs",
        "",
        f"{report['date']}, torch {report['torch']}, Python {report['python']}, "
        f"{machine_['system']}; `{report['command']}`.",
        "",
    ]


def subplots(*grid: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A new figure (matplotlib without a display, constrained layout) and its axes:
    ``plt.subplots(*grid, figsize=figsize)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*grid, figsize=figsize, layout="constrained")


def save_figure(fig: Any, path: Path) -> None:
    """``fig`` to ``path`` (a PNG at 120 dpi), then closed."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def ranks_axis(ax: Any, report: dict[str, Any]) -> None:
    """``ax`` over the rank counts of ``report``'s rows, with a grid and the legend."""
    ax.set_xticks(sorted({r["ranks"] for r in report["rows"]}))
    ax.set_xlabel("ranks on the node")
    ax.grid(alpha=0.3)
    ax.legend()


def write_outputs(
    report: dict[str, Any],
    stem: Path,
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
    console: Console,
) -> None:
    """``stem.json`` (every figure), ``stem.md`` (``markdown(report)``) and ``stem.png``
    (``plot``), in a folder made where missing; ``console`` says so."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    console.print(f"wrote {stem}.json, .md, .png")
