"""The offload benchmark: one model and batch under every offloader, on the machine it finds.

    python benchmarks/offload_bench.py                      # preset for the device found
    python benchmarks/offload_bench.py --preset bandwidth   # CUDA: batch 1, UVA read rate
    python benchmarks/offload_bench.py --preset compute --steps 20 --setup-gb 10

First it measures the machine: host-to-device copy bandwidth (pinned source, several sizes;
on the CPU a host memory copy) and the step time with no offload. Then, for the same model
(``hydra_offload.models.DecoderLM``, a Llama-shaped decoder, sizes from ``--preset``) and the
same batch, each configuration runs ``--warmup`` untimed and ``--steps`` timed forwards:

- no offload;
- hydra-offload UVA (every layer's weights in host memory);
- hydra-offload prefetch at several ``(group_size, num_in_group, prefetch_step)`` settings;
- Hugging Face diffusers group offloading (``apply_group_offloading``, block level, one block
  per group, ``use_stream=True`` on CUDA) and accelerate ``cpu_offload``, when installed
  (skipped with a note otherwise). Both offload the whole model, embeddings and head too.

For each it reports peak device memory, device memory saved against no offload (and, for
ours, the plan's figure), host memory (RSS growth and page-locked bytes), the median step
time, host-to-device bytes per step (counted in one extra forward by
:class:`hydra_offload.tuning.measure.CopyCounter`, whoever issues the copies; UVA zero-copy
reads the offloaded weights in place instead, which the table says), the achieved H2D rate, and the
overlap efficiency::

    max(no-offload step time, H2D bytes / measured bandwidth) / step time

1.0 is the physical limit: the step is as fast as compute or the interconnect allows. Every
output is checked against the no-offload output (max absolute difference reported).

A setup section times ``apply_offload`` on ``--setup-gb`` GB of weights resident in host
memory against copying them once into a page-locked buffer.

Writes ``benchmarks/results/offload-<device>.json``, ``.md`` and ``.png`` (memory saved
against step time, one point per configuration) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from node_bench import save_figure, subplots, write_outputs
from rich.console import Console
from rich.table import Table
from torch import nn

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM
from hydra_offload.tuning.measure import (
    CopyCounter,
    copy_bandwidth,
    rss_bytes,
    synchronize,
    time_calls,
)

RESULTS = Path(__file__).parent / "results"
GIB = 1024**3


@dataclass(frozen=True)
class Preset:
    """Model shape and batch."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    dtype: str
    batch: int
    seq: int
    note: str


PRESETS = {
    # A Llama-7B layer (4096/11008, bf16: 386 MiB of weights). With 32k tokens per batch each
    # layer computes for longer than its weights take to cross PCIe: prefetch can hide it all.
    "compute": Preset(4096, 11008, 16, 32, 32000, "bfloat16", 16, 2048,
                      "Llama-7B-sized layers, 32k tokens per step: compute-bound"),
    # The same layers with 16 tokens per step: every step is a read of the weights.
    "bandwidth": Preset(4096, 11008, 16, 32, 32000, "bfloat16", 1, 16,
                        "Llama-7B-sized layers, 16 tokens per step: bandwidth-bound"),
    "cpu": Preset(512, 1408, 8, 8, 1024, "float32", 4, 128,
                  "small decoder for a CPU run"),
    # Training: 56 Llama-7B-sized layers (21 GiB of bf16 weights; with their gradients and
    # AdamW's two moments, 87 GiB: more than an 80 GB device holds without offload).
    "train": Preset(4096, 11008, 56, 32, 32000, "bfloat16", 4, 512,
                    "56 Llama-7B-sized layers, 2k tokens per fit step: too big to train in 80 GB"),
    "tiny": Preset(64, 128, 4, 4, 128, "float32", 2, 16, "a smoke run (tests)"),
}  # fmt: skip

# (group_size, num_in_group, prefetch_step): every layer offloaded, with one and two slots;
# half the layers; half the layers in pairs, step = num_in_group as the docs recommend.
PREFETCH_SETTINGS = [(1, 1, 1), (1, 1, 2), (2, 1, 1), (4, 2, 2)]


@dataclass
class Candidate:
    name: str
    apply: Callable[[nn.Module, torch.device], Any]
    family: str  # "none", "ours", "other"


def _ours(config: dict) -> Callable[[nn.Module, torch.device], Any]:
    def apply(model: nn.Module, device: torch.device) -> Any:
        handle = apply_offload(model, config, device)
        model.to(device)  # what is not offloaded goes to the device
        return handle

    return apply


def _none(model: nn.Module, device: torch.device) -> None:
    model.to(device)


def _diffusers(model: nn.Module, device: torch.device) -> None:
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(
        model,
        onload_device=device,
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device.type == "cuda",
    )


def _accelerate(model: nn.Module, device: torch.device) -> None:
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=device)


def candidates() -> list[Candidate]:
    found = [
        Candidate("no offload", _none, "none"),
        Candidate("ours: uva, all layers", _ours({"uva": {"cpu_offload_gb": 1e6,
                                                         "cpu_offload_params": ["layers"]}}),
                  "ours"),
    ]  # fmt: skip
    for group, num, step in PREFETCH_SETTINGS:
        config = {
            "prefetch": {
                "offload_group_size": group,
                "offload_num_in_group": num,
                "offload_prefetch_step": step,
            }
        }
        found.append(Candidate(f"ours: prefetch G={group} K={num} S={step}", _ours(config), "ours"))
    found += [
        Candidate("diffusers group offloading (block, stream)", _diffusers, "other"),
        Candidate("accelerate cpu_offload", _accelerate, "other"),
    ]
    return found


def _peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _host_pinned() -> int:
    """Bytes page-locked through PyTorch's caching host allocator (``pin_memory()``)."""
    if not torch.cuda.is_available():
        return 0
    stats = torch.cuda.memory.host_memory_stats()
    return int(stats.get("allocated_bytes.current", 0))


def run_candidate(
    cand: Candidate,
    state: dict[str, torch.Tensor],
    preset: Preset,
    device: torch.device,
    batch: torch.Tensor,
    expected: torch.Tensor | None,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """One configuration's row, and its output (to check the others against)."""
    model = _build(preset, "cpu")
    model.load_state_dict(state)
    model.eval()
    pinned_before = _host_pinned()
    rss_before = rss_bytes()
    _peak_reset(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = cand.apply(model, device)
    except ImportError as err:
        skipped = f"not installed ({err.name})"
        return {"name": cand.name, "family": cand.family, "skipped": skipped}, None
    synchronize(device)
    setup_s = time.perf_counter() - start
    _peak_reset(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    if args.train:
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)

        def step() -> torch.Tensor:
            # A fit step: forward, backward, optimizer step. The loss is cheap on purpose.
            loss = model(batch).float().logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

    else:

        def step() -> torch.Tensor:
            with torch.no_grad():
                return model(batch)

    try:
        times = time_calls(step, device, warmup=args.warmup, repeats=args.steps)
        output = step()
        synchronize(device)
        peak = _peak(device)
        with CopyCounter(device) as copies:
            step()
            synchronize(device)
    except torch.OutOfMemoryError:
        if handle is not None:
            handle.remove()
        return {"name": cand.name, "family": cand.family, "skipped": "out of device memory"}, None
    row: dict[str, Any] = {
        "name": cand.name,
        "family": cand.family,
        "setup_s": setup_s,
        "step_ms": statistics.median(times) * 1e3,
        "step_ms_min": min(times) * 1e3,
        "peak_device_bytes": peak,
        "resident_device_bytes": resident,
        "device_bytes_before": before,
        "rss_growth_bytes": (rss_bytes() or 0) - (rss_before or 0) if rss_before else None,
        "pinned_bytes": _host_pinned() - pinned_before,
        "copied_bytes_per_step": copies.bytes,
        "max_abs_diff": (
            float((output.float() - expected.float()).abs().max()) if expected is not None else 0.0
        ),
    }
    if handle is not None:
        stats = handle.stats
        row.update(
            plan_device_bytes_saved=handle.plan.device_bytes_saved,
            offloaded_bytes=stats.offloaded_bytes,
            pinned_bytes=row["pinned_bytes"] + stats.host_bytes_pinned,
            host_bytes=stats.host_bytes,
            stalls=stats.stalls,
            uva_mode=getattr(handle._installed, "mode", None),
        )
        handle.remove()
    return row, output


def _build(preset: Preset, device: str) -> DecoderLM:
    return DecoderLM(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        num_layers=preset.num_layers,
        num_heads=preset.num_heads,
        intermediate_size=preset.intermediate_size,
        dtype=preset.dtype,
        device=device,
    )


def finish_rows(rows: list[dict[str, Any]], bandwidth: float) -> None:
    """Derived columns: H2D bytes beyond the no-offload run, rate, savings, efficiency."""
    # The no-offload run goes first and last: the faster of the two is the baseline, so
    # drift of the machine over the run does not flatter or punish the configurations.
    base = min((r for r in rows if r["family"] == "none"), key=lambda r: r["step_ms"])
    for row in rows:
        if "skipped" in row:
            continue
        extra = row["copied_bytes_per_step"] - base["copied_bytes_per_step"]
        in_place = row.get("uva_mode") in ("zero_copy", "host")
        row["host_reads"] = "read in place" if in_place else "copied"
        row["h2d_bytes_per_step"] = row.get("offloaded_bytes", 0) if in_place else max(extra, 0)
        seconds = row["step_ms"] / 1e3
        row["h2d_gb_per_s"] = row["h2d_bytes_per_step"] / seconds / 1e9
        limit = max(base["step_ms"] / 1e3, row["h2d_bytes_per_step"] / bandwidth)
        row["overlap_efficiency"] = limit / seconds
        row["slowdown"] = row["step_ms"] / base["step_ms"]
        if base["peak_device_bytes"] is not None and row["peak_device_bytes"] is not None:
            row["device_bytes_saved"] = base["peak_device_bytes"] - row["peak_device_bytes"]
            plan = row.get("plan_device_bytes_saved")
            if plan:
                row["saved_vs_plan"] = row["device_bytes_saved"] / plan
        else:
            row["device_bytes_saved"] = None


def setup_section(gb: float, device: torch.device) -> dict[str, Any]:
    """``apply_offload`` on ``gb`` GB of host-resident weights vs one copy into pinned memory."""
    accelerator = device.type != "cpu"
    width = 4096
    layer_bytes = width * width * 2
    count = max(2, int(gb * 1e9 // layer_bytes))
    model = nn.Module()
    model.layers = nn.ModuleList(
        nn.Linear(width, width, bias=False, dtype=torch.bfloat16) for _ in range(count)
    )
    model.requires_grad_(False)
    total = count * layer_bytes
    params = [p for p in model.parameters()]

    def copy_into(buffer: torch.Tensor) -> None:
        offset = 0
        for p in params:
            n = p.numel()
            buffer[offset : offset + n].view_as(p).copy_(p)
            offset += n

    buffer = torch.empty(total // 2, dtype=torch.bfloat16, pin_memory=accelerator)
    buffer.fill_(0)
    start = time.perf_counter()
    copy_into(buffer)
    copy_only = time.perf_counter() - start
    del buffer
    gc.collect()
    start = time.perf_counter()
    buffer = torch.empty(total // 2, dtype=torch.bfloat16, pin_memory=accelerator)
    copy_into(buffer)
    alloc_copy = time.perf_counter() - start
    del buffer
    gc.collect()
    result: dict[str, Any] = {
        "weights_bytes": total,
        "copy_into_pinned_s": copy_only,
        "alloc_pinned_and_copy_s": alloc_copy,
    }
    configs = {
        "uva": {"uva": {"cpu_offload_gb": 1e6}},
        "prefetch G=1": {"prefetch": {"offload_group_size": 1}},
    }
    for name, config in configs.items():
        start = time.perf_counter()
        handle = apply_offload(model, config, device)
        synchronize(device)
        elapsed = time.perf_counter() - start
        handle.remove()
        gc.collect()
        result[f"apply_{name}_s"] = elapsed
        result[f"apply_{name}_vs_copy"] = elapsed / copy_only
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def slug(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _size(n: int) -> str:
    """``386.0 MiB``: bytes in the largest binary unit that keeps the figure >= 1."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return _size(value)
    if kind == "ms":
        return f"{value:.1f}"
    if kind == "x":
        return f"{value:.3f}"
    if kind == "gbps":
        return f"{value:.2f}"
    return str(value)


COLUMNS = [
    ("configuration", "name", ""),
    ("step ms (median)", "step_ms", "ms"),
    ("slowdown", "slowdown", "x"),
    ("peak device", "peak_device_bytes", "bytes"),
    ("device saved", "device_bytes_saved", "bytes"),
    ("plan saved", "plan_device_bytes_saved", "bytes"),
    ("host RSS growth", "rss_growth_bytes", "bytes"),
    ("pinned", "pinned_bytes", "bytes"),
    ("H2D/step", "h2d_bytes_per_step", "bytes"),
    ("host reads", "host_reads", ""),
    ("H2D GB/s", "h2d_gb_per_s", "gbps"),
    ("overlap efficiency", "overlap_efficiency", "x"),
    ("max abs diff", "max_abs_diff", ""),
]


def markdown(report: dict[str, Any]) -> str:
    bw = report["bandwidth"]
    lines = [
        f"# Offload benchmark: {report['device_name']}",
        "",
        f"{report['date']}, torch {report['torch']}, preset `{report['preset']}` "
        f"({report['preset_shape']['note']}: {report['preset_shape']['num_layers']} layers, "
        f"hidden {report['preset_shape']['hidden_size']}, {report['preset_shape']['dtype']}, "
        f"batch {report['preset_shape']['batch']} x {report['preset_shape']['seq']}), "
        f"{report['steps']} timed steps after {report['warmup']} warm-up; a step is a "
        f"{report['step']}.",
        "",
        f"Bandwidth ({bw['kind']}): "
        + ", ".join(f"{size // 2**20} MiB: {gbs:.2f} GB/s" for size, gbs in bw["by_size"].items())
        + f"; planning figure {bw['gb_per_s']:.2f} GB/s.",
        "",
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report["rows"]:
        if "skipped" in row:
            blanks = " |" * (len(COLUMNS) - 2)
            lines.append(f"| {row['name']} | skipped: {row['skipped']} |{blanks}")
            continue
        lines.append("| " + " | ".join(_fmt(row.get(k), kind) for _, k, kind in COLUMNS) + " |")
    setup = report.get("setup")
    if setup:
        lines += [
            "",
            f"Setup, {setup['weights_bytes'] / 1e9:.2f} GB of host-resident bf16 weights: "
            f"one copy into a page-locked buffer {setup['copy_into_pinned_s']:.2f} s "
            f"(allocating it too: {setup['alloc_pinned_and_copy_s']:.2f} s); "
            f"apply_offload UVA {setup['apply_uva_s']:.2f} s "
            f"({setup['apply_uva_vs_copy']:.2f} x the copy), prefetch G=1 "
            f"{setup['apply_prefetch G=1_s']:.2f} s ({setup['apply_prefetch G=1_vs_copy']:.2f} x).",
        ]
    return "\n".join(lines) + "\n"


CONSOLE_COLUMNS = ("configuration", "step ms (median)", "slowdown", "device saved",
                   "pinned", "H2D/step", "H2D GB/s", "overlap efficiency")  # fmt: skip


def rich_table(report: dict[str, Any]) -> Table:
    """The key columns (the Markdown file has them all)."""
    columns = [c for c in COLUMNS if c[0] in CONSOLE_COLUMNS]
    table = Table(title=f"Offload benchmark on {report['device_name']} ({report['preset']})")
    for title, _, kind in columns:
        table.add_column(title, justify="left" if not kind else "right")
    for row in report["rows"]:
        if "skipped" in row:
            table.add_row(row["name"], f"skipped: {row['skipped']}")
            continue
        table.add_row(*(_fmt(row.get(k), kind) for _, k, kind in columns))
    return table


def plot(report: dict[str, Any], path: Path) -> None:
    measured = any(r.get("device_bytes_saved") is not None for r in report["rows"])
    key = "device_bytes_saved" if measured else "offloaded_bytes"
    fig, ax = subplots(figsize=(8, 5))
    for row in report["rows"]:
        if "skipped" in row or row.get(key) is None:
            continue
        x, y = row["step_ms"], row[key] / GIB
        ax.scatter([x], [y], marker="o" if row["family"] == "ours" else "s")
        ax.annotate(row["name"], (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("step time, median (ms)")
    ax.set_ylabel("device memory saved (GiB)" if measured else "weights offloaded (GiB)")
    ax.set_title(f"{report['device_name']}, preset {report['preset']}")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (the docs' benchmark commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="default: compute on CUDA, cpu on the CPU")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--setup-gb", type=float, default=None,
        help="GB of weights for the setup timing; 0 skips it (default: 10 on CUDA, 1 on CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--only", nargs="*", default=None,
        help="run only the configurations whose name contains one of these (and no offload)",
    )  # fmt: skip
    parser.add_argument(
        "--train", action="store_true",
        help="time fit steps (forward, backward, AdamW step) instead of forwards",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on the CPU: 1)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads or device.type == "cpu":
        # On the CPU, one thread by default: copies and compute then share a core the same
        # way in every configuration, and the figures are steadier.
        torch.set_num_threads(args.threads or 1)
    preset_name = args.preset or ("compute" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    console = Console(width=160) if not sys.stdout.isatty() else Console()
    console.print(f"[bold]device[/]: {device_name(device)}; preset {preset_name}: {preset.note}")

    if preset_name == "tiny":
        sizes: tuple[int, ...] = (1 << 20,)
    else:
        sizes = (16 << 20, 64 << 20, 256 << 20) + ((1 << 30,) if device.type == "cuda" else ())
    bandwidth = copy_bandwidth(device, sizes=sizes)
    console.print(f"bandwidth ({bandwidth.kind}): {bandwidth.gb_per_s:.2f} GB/s")

    torch.manual_seed(0)
    state = _build(preset, "cpu").state_dict()
    batch = torch.randint(0, preset.vocab_size, (preset.batch, preset.seq), device=device)
    rows: list[dict[str, Any]] = []
    expected = None
    for cand in [*candidates(), Candidate("no offload (again)", _none, "none")]:
        if args.only and cand.family != "none" and not any(s in cand.name for s in args.only):
            continue
        console.print(f"running: {cand.name}")
        if args.train and cand.family == "other":
            rows.append({"name": cand.name, "family": cand.family,
                         "skipped": "inference only (documented as not for training)"})  # fmt: skip
            continue
        row, output = run_candidate(cand, state, preset, device, batch, expected, args)
        if expected is None and output is not None:
            expected = output
        rows.append(row)
    finish_rows(rows, bandwidth.bytes_per_s)

    setup_gb = args.setup_gb
    if setup_gb is None:
        setup_gb = 10.0 if device.type == "cuda" else 1.0
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "preset": preset_name,
        "preset_shape": asdict(preset),
        "steps": args.steps,
        "step": "fit step (forward, backward, AdamW)" if args.train else "forward (no_grad)",
        "warmup": args.warmup,
        "bandwidth": {
            "kind": bandwidth.kind,
            "by_size": bandwidth.by_size,
            "gb_per_s": bandwidth.gb_per_s,
        },
        "rows": rows,
        "setup": setup_section(setup_gb, device) if setup_gb > 0 else None,
    }
    console.print(rich_table(report))
    mode = "-train" if args.train else ""
    stem = args.out / f"offload-{slug(device)}-{preset_name}{mode}"
    write_outputs(report, stem, markdown, plot, console)
    return report


if __name__ == "__main__":
    main()
