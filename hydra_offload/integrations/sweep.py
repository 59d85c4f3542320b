"""Multirun summaries: one row per job of a Hydra sweep, as Markdown, CSV and a plot.

Each job writes its figures with :func:`write_job_summary` (``job_summary.json`` in the job's
output directory): :class:`~hydra_offload.OffloadCallback` does it in any Hydra app that uses
it, and ``run.py`` writes its own. When the sweep ends, the :class:`SweepSummary` Hydra
callback gathers them and writes ``sweep_summary.md``, ``sweep_summary.csv`` and
``sweep_summary.png`` (device memory saved against time per step, one point per job) into the
sweep directory. It works with any sweeper and launcher that gives each job its own
subdirectory of ``hydra.sweep.dir`` (the basic sweeper, Optuna, the joblib launcher).

Register it in the app's config::

    hydra:
      callbacks:
        sweep_summary:
          _target_: hydra_offload.integrations.sweep.SweepSummary
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "COLUMNS",
    "SweepSummary",
    "job_output_dir",
    "read_job_summaries",
    "write_job_summary",
]

log = logging.getLogger(__name__)

JOB_FILE = "job_summary.json"

COLUMNS = (
    "job",
    "overrides",
    "backend",
    "config_hash",
    "device",
    "peak_device_bytes",
    "device_bytes_saved",
    "step_ms",
    "h2d_gb_s",
    "error",
)
"""The columns of the sweep summary, in order (``error``: why a job failed, if it did)."""


def job_output_dir() -> Path | None:
    """The output directory of the Hydra job running now, or ``None``: outside a Hydra job,
    and where Hydra's config was set without one (tests of Hydra apps set it from a composed
    config, ``compose(..., return_hydra_config=True)``, in which ``runtime.output_dir`` is
    missing).

    Example:
        >>> job_output_dir() is None  # not inside a Hydra job
        True
    """
    if not HydraConfig.initialized():
        return None
    value = OmegaConf.select(
        HydraConfig.get(), "runtime.output_dir", default=None, throw_on_missing=False
    )
    return Path(str(value)) if value else None


def write_job_summary(summary: dict[str, Any], output_dir: str | Path | None = None) -> Path:
    """Write one job's figures (keys from :data:`COLUMNS`, and any others; ``job`` and
    ``overrides`` are filled in from Hydra when missing) to ``job_summary.json`` in
    ``output_dir``, by default the Hydra job's output directory.

    Example:
        >>> import json, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> path = write_job_summary({"job": 0, "backend": "uva", "step_ms": 2.5}, folder)
        >>> json.loads(path.read_text())["step_ms"]
        2.5
    """
    record = dict(summary)
    output_dir = output_dir or job_output_dir()
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        num = OmegaConf.select(hydra_cfg, "job.num", default=0, throw_on_missing=False)
        task = OmegaConf.select(hydra_cfg, "overrides.task", default=[], throw_on_missing=False)
        record.setdefault("job", num if isinstance(num, int) else 0)
        record.setdefault("overrides", " ".join(task or []))
    if output_dir is None:
        raise ValueError("output_dir is required outside a Hydra job")
    path = Path(output_dir) / JOB_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def read_job_summaries(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job summary under ``sweep_dir``, in job order."""
    rows = [json.loads(p.read_text()) for p in Path(sweep_dir).glob(f"*/{JOB_FILE}")]
    return sorted(rows, key=lambda row: int(row.get("job", 0)))


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarize its jobs in the sweep directory.

    Args:
        filename: stem of the files written (``.md``, ``.csv``, ``.png``).

    Example:
        >>> SweepSummary().filename
        'sweep_summary'
    """

    def __init__(self, filename: str = "sweep_summary") -> None:
        self.filename = filename

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = read_job_summaries(sweep_dir)
        if not rows:
            log.warning("sweep summary: no %s found under %s", JOB_FILE, sweep_dir)
            return
        written = [
            write_markdown(rows, sweep_dir / f"{self.filename}.md"),
            write_csv(rows, sweep_dir / f"{self.filename}.csv"),
            plot(rows, sweep_dir / f"{self.filename}.png"),
        ]
        log.info("sweep summary of %d jobs: %s", len(rows), ", ".join(map(str, written)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(rows: list[dict[str, Any]], path: Path) -> Path:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |" for row in rows),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Device memory saved (MiB) against time per step (ms), one labelled point per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for row in rows:
        x, y = row.get("step_ms"), (row.get("device_bytes_saved") or 0) / 2**20
        if x is None:
            continue
        ax.scatter([x], [y])
        label = row.get("overrides") or row.get("backend", "")
        ax.annotate(f"{row.get('job')}: {label}", (x, y), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))  # fmt: skip
    ax.set_xlabel("time per step (ms)")
    ax.set_ylabel("device memory saved (MiB)")
    ax.set_title("hydra-offload sweep: memory saved vs step time")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
