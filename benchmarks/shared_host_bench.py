"""One host copy per node: what the data-parallel processes of one node hold in host memory.

    python benchmarks/shared_host_bench.py                         # 1, 2, 4 ranks; 128 MiB; UVA
    python benchmarks/shared_host_bench.py --backend prefetch      # prefetch, one layer a slot
    python benchmarks/shared_host_bench.py --ranks 2 8 --mib 512 --forwards 10

On this machine, for every rank count of ``--ranks`` and every option, a fresh set of
processes starts as ``torchrun`` would start them (gloo on the CPU; ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` in the
environment), so that no measurement inherits what an earlier one left in a process. The
options:

- ``off``: no offload; every rank holds its own weights;
- ``per-rank``: ``apply_offload(..., process_group=WORLD)`` with ``share_host_memory: False``:
  every rank keeps its own host copy of the offloaded weights;
- ``shared``: the same with sharing on (the default): the node's first rank fills one copy
  in shared memory and the others map it.

The model: a stack of frozen ``nn.Linear`` layers (``--mib`` MiB of fp32 weights and biases
over ``--layers`` layers; by default 32 layers of 1024 x 1024, 128 MiB), all offloaded, and a
small head (``Linear(width, 8)``) that is not. Every rank builds it from the same seed,
computes the reference output without offload, meets the others at a barrier, times
``apply_offload`` (the setup; nothing for ``off``), then runs ``--forwards`` forwards,
reading its proportional set size (``Pss`` of ``/proc/self/smaps_rollup``: a page that ``n``
processes map counts ``1/n`` in each) after each one, all ranks together (between two
barriers: a rank's Pss counts a shared page only once the rank has touched it, so readings
taken at different moments would not add up), and checks every output equals the reference
(``torch.equal``). Rank 0 gathers the figures (``all_gather_object``).

Per (ranks, option): the node's host memory, the SUM of the ranks' Pss after a forward (pages
the ranks share count once for the node; the largest such sum over the forwards); the saving
against ``off``; the expected figure; the change over the setup (the node's Pss less the
ranks' Pss once the model was built, before ``apply_offload``: measured in the same processes,
so their start-up noise, a few MiB a process, cancels out); the median and largest setup time
across ranks; ``stats.host_bytes_shared`` and ``stats.shared_by``; whether the outputs equal
the reference. The expected figure comes from the ``off`` run of the same rank count: each
rank's Pss less its weights is its non-offloaded part, so

    per-rank: sum of the off ranks' Pss + ranks x pool      (every rank its own copy)
    shared:   that - (ranks - 1) x offloaded bytes          (one copy for the node)

(``pool``: a rank's prefetch slots, ``stats.pool_bytes``; 0 with UVA). One rank shares with
nobody: its ``shared`` row is a process of its own, ``shared_by`` 1.

The launcher process is not counted; it imports torch too, so the ranks' Pss of the library
pages is a share of them, alike in every option of a rank count.

Writes ``benchmarks/results/shared_host-cpu.json`` (every figure, every rank's readings, the
machine, torch version, date and command), ``.md`` (the table) and ``.png`` (the node's Pss
against the rank count, one line per option) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import node_bench
import torch
import torch.distributed as dist
from node_bench import MIB
from rich.table import Table

from hydra_offload import apply_offload

OPTIONS = ("off", "per-rank", "shared")
OPTION_TITLES = {
    "off": "off (no offload)",
    "per-rank": "per-rank copies",
    "shared": "shared copy",
}
BACKENDS = {
    # Every layer's weights in host memory, read in place.
    "uva": {"uva": {"cpu_offload_gb": 1.0e6, "cpu_offload_params": ["layers"]}},
    # Every layer offloaded, one layer's slots on the compute device (here the CPU).
    "prefetch": {"prefetch": {"offload_group_size": 1}, "layers": "layers"},
}
SEED = 0
BATCH = 4


def config_for(backend: str, option: str) -> dict[str, Any] | None:
    if option == "off":
        return None
    return {**BACKENDS[backend], "share_host_memory": option == "shared"}


def measure(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank's figures for one option (the process group is up)."""
    torch.set_num_threads(1)
    pss_bare = node_bench.pss_bytes()
    torch.manual_seed(SEED)
    model = node_bench.LinearStack(spec["width"], spec["depth"]).eval()
    model.layers.requires_grad_(False)  # frozen and offloaded; the head is not offloaded
    x = torch.randn(BATCH, spec["width"], generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        expected = model(x)
    pss_built = node_bench.pss_bytes()
    config = config_for(spec["backend"], spec["option"])
    dist.barrier()
    start = time.perf_counter()
    handle = apply_offload(model, config, process_group=dist.group.WORLD) if config else None
    setup_s = time.perf_counter() - start if config else None
    equal = True
    readings = []
    with torch.no_grad():
        for _ in range(spec["forwards"]):
            equal = torch.equal(model(x), expected) and equal
            # Every rank reads after the same forward: a page counts in a rank's Pss once the
            # rank has touched it, so the ranks' readings add up only when taken together.
            dist.barrier()
            readings.append(node_bench.pss_bytes())
            dist.barrier()
    result: dict[str, Any] = {
        "rank": rank,
        "pid": os.getpid(),
        "pss_bare_bytes": pss_bare,
        "pss_built_bytes": pss_built,
        "pss_readings_bytes": readings,
        "pss_max_bytes": max(readings),
        "setup_s": setup_s,
        "outputs_equal": equal,
    }
    if handle is not None:
        result.update(node_bench.offload_figures(handle))
        dist.barrier()  # every rank has read its memory before any lets go of the weights
        handle.remove()
    return result


def launch(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """Start ``spec["ranks"]`` fresh processes for one option; their figures, and the
    launch's wall seconds. A rank that does not exit cleanly fails the run, even after it
    finished it."""
    with tempfile.TemporaryDirectory(prefix="shared_host_bench-") as tmp:
        per_rank, wall, note = node_bench.launch(measure, spec, Path(tmp) / "ranks.json")
    if note is not None:
        raise RuntimeError(f"{spec['ranks']} rank(s), {spec['option']}: {note}")
    return per_rank, wall


def summarize(
    ranks: int, option: str, per_rank: list[dict[str, Any]], wall: float, weights: int
) -> dict[str, Any]:
    setups = [r["setup_s"] for r in per_rank if r["setup_s"] is not None]
    row: dict[str, Any] = {
        "ranks": ranks,
        "option": option,
        # The node after each forward (the ranks read together), the largest of those, and
        # what the offload changed, in the same processes.
        **node_bench.node_pss(per_rank),
        "setup_s_median": statistics.median(setups) if setups else None,
        "setup_s_max": max(setups) if setups else None,
        "outputs_equal": all(r["outputs_equal"] for r in per_rank),
        "offloaded_bytes": node_bench.same([r.get("offloaded_bytes", 0) for r in per_rank]),
        "host_bytes_shared": node_bench.same([r.get("host_bytes_shared", 0) for r in per_rank]),
        "shared_by": node_bench.same([r.get("shared_by", 1) for r in per_rank]),
        "pool_bytes": node_bench.same([r.get("pool_bytes", 0) for r in per_rank]),
        "launch_wall_s": wall,
        "per_rank": per_rank,
    }
    if option == "off":
        # Each rank's own part: its Pss less its weights.
        row["non_offloaded_bytes"] = [r["pss_max_bytes"] - weights for r in per_rank]
    return row


def finish_rows(rows: list[dict[str, Any]], weights: int) -> None:
    """Saving against ``off`` and the expected figure, per rank count."""
    off = {row["ranks"]: row for row in rows if row["option"] == "off"}
    for row in rows:
        base = off.get(row["ranks"])
        if base is None:
            row["saved_vs_off_bytes"] = row["expected_node_bytes"] = None
            continue
        row["saved_vs_off_bytes"] = base["node_pss_bytes"] - row["node_pss_bytes"]
        row["saved_vs_off_fraction"] = row["saved_vs_off_bytes"] / base["node_pss_bytes"]
        pool = row["pool_bytes"] if isinstance(row["pool_bytes"], int) else 0
        expected = base["node_pss_bytes"] + row["ranks"] * pool
        if row["option"] == "shared" and row["shared_by"] == row["ranks"] > 1:
            expected -= (row["ranks"] - 1) * weights
        row["expected_node_bytes"] = expected
        row["vs_expected_bytes"] = row["node_pss_bytes"] - expected


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _saving(row: dict[str, Any]) -> str:
    if row["saved_vs_off_bytes"] is None or row["option"] == "off":
        return "-"
    return f"{row['saved_vs_off_bytes'] / MIB:.1f} ({100 * row['saved_vs_off_fraction']:.0f} %)"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


COLUMNS = [
    ("ranks", lambda r: str(r["ranks"])),
    ("option", lambda r: OPTION_TITLES[r["option"]]),
    ("node Pss MiB", lambda r: _mib(r["node_pss_bytes"])),
    ("expected MiB", lambda r: _mib(r["expected_node_bytes"])),
    ("saving vs off MiB", _saving),
    ("change over setup MiB", lambda r: _mib(r["node_pss_change_bytes"])),
    ("setup s (median)", lambda r: _seconds(r["setup_s_median"])),
    ("setup s (max)", lambda r: _seconds(r["setup_s_max"])),
    ("host bytes shared", lambda r: f"{r['host_bytes_shared']:,}" if r["option"] != "off"
     else "-"),
    ("shared by", lambda r: str(r["shared_by"]) if r["option"] != "off" else "-"),
    ("outputs equal", lambda r: "yes" if r["outputs_equal"] else "NO"),
]  # fmt: skip


def describe(report: dict[str, Any]) -> str:
    model = report["model"]
    return (
        f"{model['depth']} frozen Linear({model['width']}, {model['width']}) layers, "
        f"{model['offloaded_bytes'] / MIB:.1f} MiB fp32, offloaded with "
        f"{report['backend']}; a head Linear({model['width']}, 8) not offloaded; "
        f"{report['forwards']} forwards of a {BATCH} x {model['width']} batch per rank"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        *node_bench.heading("One host copy per node", report),
        f"{describe(report)}. Each (ranks, option) in fresh processes (gloo on the CPU). "
        "Node Pss: the sum over the ranks of their Pss, read together after each forward "
        "(shared pages count once for the node); the largest over the forwards. "
        "Expected: the `off` run's node Pss, less "
        "(ranks - 1) copies of the offloaded weights when they are shared, plus each rank's "
        "prefetch slots. Change over setup: the node Pss less the ranks' Pss once the model "
        "was built, before the offload (in the same processes: their start-up noise cancels "
        "out).",
        "",
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |")
    lines += ["", f"Total wall time {report['wall_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def rich_table(report: dict[str, Any]) -> Table:
    offloaded = report["model"]["offloaded_bytes"] / MIB
    table = Table(
        title=f"One host copy per node ({report['backend']}, {offloaded:.0f} MiB offloaded)"
    )
    for index, (title, _) in enumerate(COLUMNS):
        table.add_column(title, justify="left" if index == 1 else "right")
    previous = None
    for row in report["rows"]:
        if previous is not None and row["ranks"] != previous:
            table.add_section()
        previous = row["ranks"]
        table.add_row(*(cell(row) for _, cell in COLUMNS))
    return table


def plot(report: dict[str, Any], path: Path) -> None:
    fig, ax = node_bench.subplots(figsize=(7, 4.5))
    for option in OPTIONS:
        rows = [r for r in report["rows"] if r["option"] == option]
        if not rows:
            continue
        ax.plot([r["ranks"] for r in rows], [r["node_pss_bytes"] / MIB for r in rows],
                marker="o", label=OPTION_TITLES[option])  # fmt: skip
    expected = [r for r in report["rows"]
                if r["option"] == "shared" and r["expected_node_bytes"] is not None]  # fmt: skip
    if expected:
        ax.plot([r["ranks"] for r in expected],
                [r["expected_node_bytes"] / MIB for r in expected],
                linestyle="--", color="grey", label="expected, shared copy")  # fmt: skip
    node_bench.ranks_axis(ax, report)
    ax.set_ylabel(node_bench.NODE_PSS_LABEL)
    ax.set_title(f"{report['model']['offloaded_bytes'] / MIB:.0f} MiB offloaded "
                 f"({report['backend']}), {report['machine']['processor']}")  # fmt: skip
    node_bench.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    node_bench.add_arguments(
        parser,
        backends=BACKENDS,
        options=OPTIONS,
        ranks_help="rank counts, each a fresh set of processes (default: 1 2 4)",
        mib_help="MiB of frozen offloaded weights (default: 128)",
        layers_help="offloaded layers (default: 32)",
        options_help="which options to run (default: all three)",
    )
    parser.add_argument(
        "--forwards",
        type=int,
        default=3,
        help="forwards per rank, Pss read after each (default: 3)",
    )
    args = parser.parse_args(argv)
    if min(args.ranks) < 1 or args.forwards < 1 or args.layers < 1 or args.mib <= 0:
        parser.error("--ranks, --forwards, --layers and --mib must be positive")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the ranks share the cores
    width, depth, console = node_bench.begin(args, args.options)
    weights = node_bench.layer_bytes(width, depth)

    started = time.perf_counter()
    rows = []
    for ranks in args.ranks:
        for option in OPTIONS:
            if option not in args.options:
                continue
            spec = {"ranks": ranks, "option": option, "backend": args.backend,
                    "width": width, "depth": depth, "forwards": args.forwards}  # fmt: skip
            per_rank, wall = launch(spec)
            rows.append(summarize(ranks, option, per_rank, wall, weights))
            console.print(f"{ranks} rank(s), {option}: node Pss "
                          f"{rows[-1]['node_pss_bytes'] / MIB:.1f} MiB ({wall:.1f} s)")  # fmt: skip
    finish_rows(rows, weights)

    report: dict[str, Any] = {
        **node_bench.report_head("benchmarks/shared_host_bench.py", argv),
        "backend": args.backend,
        "config": BACKENDS[args.backend],
        "forwards": args.forwards,
        "model": {
            "width": width,
            "depth": depth,
            "offloaded_bytes": weights,
            "head": f"Linear({width}, 8), not offloaded",
        },
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    console.print(rich_table(report))
    node_bench.write_outputs(report, args.out / "shared_host-cpu", markdown, plot, console)
    return report


if __name__ == "__main__":
    main()
