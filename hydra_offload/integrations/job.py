"""The main job behind ``run.py``: the embedded model under a Lightning Trainer, offloaded
by the ``OffloadCallback`` that Hydra builds from ``callbacks/offload.yaml``.

The job validates ``offload`` first (one clear line and exit status 2 when it is wrong),
runs ``predict`` (or ``fit`` with ``mode=fit``) with Lightning's progress bar, and ends with
a summary: the resolved config and its hash, the plan, peak device memory, time per step and
host-to-device throughput. It also writes the figures to ``job_summary.json`` for
:class:`~hydra_offload.integrations.sweep.SweepSummary`. A job that only plans (``+dry_run=true``,
or a model on the ``meta`` device) writes the plan's picture, ``offload_plan.png``
(:mod:`hydra_offload.pictures`), into the Hydra output directory; a job that runs has the
callback write it there, with ``offload_plan.txt``, and under the prefetch backend the timeline
of its second step (a warm one), ``offload_timeline.png``.

With ``objective`` set (``step_time``, ``peak_memory`` or a list of both) the job returns
that figure (a list for several) instead of its summary, for a sweeper that minimizes what
the job returns (Hydra's Optuna sweeper). In a multirun, settings that cannot run (out of
memory, an offload or config error) then return an
:class:`~hydra_offload.integrations.trial.InfeasibleTrial`, which the Optuna sweeper records as
a failed trial before it goes on with the study.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from hydra_offload._applied import note_applied
from hydra_offload.config import OffloadConfig, OffloadConfigError, to_offload_config
from hydra_offload.integrations.lightning import OffloadCallback
from hydra_offload.integrations.sweep import job_output_dir, write_job_summary
from hydra_offload.integrations.trial import InfeasibleTrial
from hydra_offload.models import LitDecoderLM, random_tokens
from hydra_offload.offload import OffloadError
from hydra_offload.pictures import (
    PLAN_PICTURE,
    TIMELINE_PICTURE,
    save_plan_picture,
)
from hydra_offload.plan import plan_offload
from hydra_offload.render import format_bytes, render_plan, render_stats
from hydra_offload.stacks import LayerStackError
from hydra_offload.tuning.measure import copy_bandwidth, time_calls
from hydra_offload.tuning.search import Suggestion, suggest_prefetch

__all__ = [
    "OBJECTIVES",
    "InfeasibleTrial",
    "JobResult",
    "StepTimer",
    "fail",
    "objectives",
    "run_job",
]

OBJECTIVES = {
    "step_time": "median time per step, in milliseconds",
    "peak_memory": "peak device memory, in MiB (on a CPU: the plan's device-resident weights)",
}
"""What ``objective`` may name, and the figure each returns (every one is minimized)."""

_OPTIMIZING_SWEEPERS = ("OptunaSweeper", "NevergradSweeper", "AxSweeper")


def fail(message: str) -> NoReturn:
    """End the job with a one-line error (one line per problem) and exit status 2."""
    print("error: " + message.replace("\n", "\nerror: "), file=sys.stderr)
    raise SystemExit(2)


def objectives(cfg: DictConfig) -> tuple[str, ...]:
    """The names in ``cfg.objective`` (``()`` when it is null); a wrong one fails the job.

    Example:
        >>> from omegaconf import OmegaConf
        >>> objectives(OmegaConf.create({"objective": ["step_time", "peak_memory"]}))
        ('step_time', 'peak_memory')
        >>> objectives(OmegaConf.create({"objective": None}))
        ()
    """
    value = cfg.get("objective")
    if value is None:
        return ()
    names = list(value) if isinstance(value, ListConfig) else [value]
    if (
        not names
        or any(not isinstance(n, str) or n not in OBJECTIVES for n in names)
        or len(set(names)) != len(names)
    ):
        given = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        fail(
            f"objective: got {given!r}; expected null, one of {', '.join(OBJECTIVES)}, or a "
            "list of them, e.g. objective=[step_time,peak_memory]"
        )
    return tuple(str(n) for n in names)


def _check_sweeper(goals: Sequence[str]) -> None:
    """A sweeper that minimizes the job's return value needs ``objective``, and Optuna's
    ``direction`` must minimize each of them."""
    if not HydraConfig.initialized():
        return
    sweeper = HydraConfig.get().sweeper
    name = str(sweeper.get("_target_", "")).rsplit(".", 1)[-1]
    if name not in _OPTIMIZING_SWEEPERS:
        return
    if not goals:
        fail(
            f"objective: the {name} minimizes what the job returns, and objective is null; "
            "set objective=step_time, objective=peak_memory or objective=[step_time,peak_memory]"
        )
    if name != "OptunaSweeper":
        return
    direction = sweeper.get("direction")
    given = list(direction) if isinstance(direction, (list, ListConfig)) else [direction]
    directions = [getattr(d, "name", str(d)) for d in given]
    if directions != ["minimize"] * len(goals):
        wanted = "minimize" if len(goals) == 1 else "[" + ",".join(["minimize"] * len(goals)) + "]"
        fail(
            f"objective: {', '.join(goals)} {'is' if len(goals) == 1 else 'are'} minimized, "
            f"but hydra.sweeper.direction is {directions}; set hydra.sweeper.direction={wanted}"
        )


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class StepTimer(Callback):
    """Wall time of each training or prediction step, synchronized with the device.

    The first step (warm-up) is left out of :attr:`median_ms`.
    """

    def __init__(self) -> None:
        self.times_ms: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync(trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def _begin(self, trainer: Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def _end(self, trainer: Trainer, *args: Any) -> None:
        self._sync(trainer)
        self.times_ms.append((time.perf_counter() - self._start) * 1000)

    on_train_batch_start = on_predict_batch_start = _begin
    on_train_batch_end = on_predict_batch_end = _end

    @property
    def median_ms(self) -> float | None:
        timed = self.times_ms[1:] or self.times_ms
        return statistics.median(timed) if timed else None


def validated(cfg: DictConfig) -> OffloadConfig:
    try:
        return to_offload_config(cfg.offload)
    except OffloadConfigError as err:
        fail(str(err))


JobResult = dict[str, Any] | float | list[float] | InfeasibleTrial
"""What :func:`run_job` returns: its summary, or with ``objective`` set the objective's
value(s), or an :class:`InfeasibleTrial`."""


def run_job(cfg: DictConfig, console: Console | None = None) -> JobResult:
    """Run the job ``cfg`` describes and write its summary; returns the summary, or with
    ``objective`` set the figure(s) it names (an :class:`InfeasibleTrial` for settings that
    cannot run, in a multirun)."""
    console = console or Console(highlight=False)
    goals = objectives(cfg)
    _check_sweeper(goals)
    infeasible_as_trial = bool(goals) and _multirun()
    try:
        offload = to_offload_config(cfg.offload)
    except OffloadConfigError as err:
        if not infeasible_as_trial:
            fail(str(err))
        return _infeasible(goals, str(err), {}, console)
    console.print("[bold]offload config[/bold] (validated)")
    console.print(OmegaConf.to_yaml(offload.model_dump(mode="json")).rstrip())
    console.print(f"resolved backend: {offload.resolved_backend}")
    console.print(f"config hash: {offload.compute_hash()}")
    if cfg.get("dry_run", False) or str(cfg.model.get("device")) == "meta":
        if goals:
            fail(
                "objective: this job only plans (dry_run, or a model on the meta device), so "
                "there is nothing to measure; set objective=null"
            )
        return _plan_only(cfg, offload, console)
    suggestion = _suggest(cfg, console) if cfg.get("suggest", False) else None
    if suggestion is not None:
        offload = validated(cfg)

    torch.manual_seed(cfg.data.seed)
    module = LitDecoderLM(instantiate(cfg.model), lr=cfg.lr)
    data = random_tokens(
        cfg.model.vocab_size, cfg.data.seq_len, cfg.data.samples, cfg.data.batch_size,
        seed=cfg.data.seed,
    )  # fmt: skip
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    timer = StepTimer()
    trainer = Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=[*callbacks, timer]
    )
    device = trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    error: str | None = None
    try:
        _run(trainer, module, data, str(cfg.mode))
    except (LayerStackError, OffloadError) as err:
        if not infeasible_as_trial:
            fail(str(err))
        error = str(err)
    except torch.OutOfMemoryError as err:
        if not infeasible_as_trial:
            raise
        error = "out of memory: " + (str(err).strip().splitlines() or [""])[0]
    if error is not None:
        del trainer, module, callbacks, timer  # the next trial may run in this process
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record = {
            "backend": offload.resolved_backend,
            "config_hash": offload.compute_hash(),
            "device": str(device),
        }
        return _infeasible(goals, error, record, console)
    offloads = [c for c in callbacks if isinstance(c, OffloadCallback)]
    folder = job_output_dir()
    if folder is not None and trainer.is_global_zero:  # the pictures the callback drew
        for what, name in (("plan", PLAN_PICTURE), ("timeline", TIMELINE_PICTURE)):
            if (folder / name).exists():
                console.print(f"{what} picture: {folder / name}", soft_wrap=True)
    summary = _summary(offload, offloads, timer, trainer)
    if suggestion is not None:
        summary["predicted_step_ms"] = suggestion.predicted_step_seconds * 1e3
    if offloads and offloads[0].last_stats is not None:
        console.print(render_stats(offloads[0].last_stats))
    console.print(_summary_table(summary))
    if suggestion is not None:
        measured = summary["step_ms"]
        console.print(
            f"suggested settings: predicted {summary['predicted_step_ms']:.2f} ms per forward, "
            f"measured {'-' if measured is None else f'{measured:.2f}'} ms per predict step "
            "(median; the step also runs Lightning's loop and the batch transfer)"
        )
    if not goals:
        write_job_summary(summary)
        return summary
    values = _objective_values(goals, summary, module, console)
    if isinstance(values, InfeasibleTrial):
        if not infeasible_as_trial:
            fail(values.reason)
        return _infeasible(goals, values.reason, summary, console)
    summary["objective"] = list(goals)
    summary["objective_value"] = values
    write_job_summary(summary)
    return values[0] if len(values) == 1 else values


def _infeasible(
    goals: Sequence[str], reason: str, record: dict[str, Any], console: Console
) -> InfeasibleTrial:
    """Report a trial whose settings cannot run: one error line, the job summary with the
    reason, and the value that the Optuna sweeper records as a failed trial."""
    print("error: " + reason.replace("\n", "\nerror: "), file=sys.stderr)
    console.print(f"objective {', '.join(goals)}: infeasible settings, reported as a failed trial")
    write_job_summary({**record, "objective": list(goals), "error": reason})
    return InfeasibleTrial(reason)


def _objective_values(
    goals: Sequence[str], summary: dict[str, Any], module: LightningModule, console: Console
) -> list[float] | InfeasibleTrial:
    values: list[float] = []
    for goal in goals:
        if goal == "step_time":
            if summary["step_ms"] is None:
                return InfeasibleTrial("objective step_time: no step ran, so none was timed")
            values.append(float(summary["step_ms"]))
            console.print(f"objective step_time: {values[-1]:.3f} ms (median time per step)")
            continue
        peak = summary["peak_device_bytes"]
        if peak is not None:
            values.append(peak / 2**20)
            console.print(f"objective peak_memory: {values[-1]:.3f} MiB (peak device memory)")
            continue
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        values.append((weights - summary["device_bytes_saved"]) / 2**20)
        console.print(
            f"objective peak_memory: {values[-1]:.3f} MiB: not measured on {summary['device']}; "
            "the plan's weight bytes left on the device stand in"
        )
    return values


def _suggest(cfg: DictConfig, console: Console) -> Suggestion:
    """Measure the machine and the model, then switch ``cfg.offload`` to the prefetch
    settings :func:`~hydra_offload.tuning.search.suggest_prefetch` proposes for the budget."""
    if str(cfg.mode) != "predict":
        fail(f"suggest: predicts the time of a forward; run it with mode=predict, not {cfg.mode}")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(cfg.data.seed)
    model = instantiate(cfg.model).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len))
    console.print(f"[bold]suggest[/bold]: measuring on {device} ...")
    bandwidth = copy_bandwidth(device, sizes=(16 << 20, 64 << 20))
    layer_s, other_s, activation_bytes = measure_decoder(model, ids, device)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    budget_gb = cfg.get("suggest_device_gb")
    if budget_gb is not None:
        budget = int(float(budget_gb) * 1024**3)
    elif cuda:
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.9)
    else:
        budget = total // 2  # a CPU has no device memory to fit: show half the model
    console.print(
        f"  {bandwidth.kind} bandwidth {bandwidth.gb_per_s:.2f} GB/s; "
        f"{layer_s * 1e3:.3f} ms per layer, {other_s * 1e3:.3f} ms outside the layers; "
        f"activations {format_bytes(activation_bytes)}; device budget {format_bytes(budget)}"
        + ("" if budget_gb is not None or cuda else " (half the model: set suggest_device_gb)")
    )
    try:
        suggestion = suggest_prefetch(
            model,
            layer_seconds=layer_s,
            bandwidth=bandwidth.bytes_per_s,
            device_budget_bytes=budget,
            other_seconds=other_s,
            activation_bytes=activation_bytes,
        )
    except ValueError as err:
        fail(f"suggest: {err}")
    console.print(suggestion.table())
    console.print("overrides: " + " ".join(suggestion.overrides))
    OmegaConf.update(cfg, "offload", suggestion.config.model_dump(mode="json"), merge=False)
    return suggestion


def measure_decoder(
    model: torch.nn.Module, ids: torch.Tensor, device: torch.device
) -> tuple[float, float, int]:
    """Seconds of one layer of a :class:`~hydra_offload.models.DecoderLM`-shaped model on
    ``device`` for the batch ``ids``, seconds of the rest (embedding, norm, head), and the
    device bytes their activations take at peak. Only those parts go to the device."""
    embed, layer = model.embed_tokens.to(device), model.layers[0].to(device)
    head = torch.nn.Sequential(model.norm, model.lm_head).to(device)
    ids = ids.to(device)
    cuda = device.type == "cuda"
    with torch.no_grad():
        hidden = embed(ids)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        layer_s = statistics.median(time_calls(lambda: layer(hidden), device, repeats=5))
        other_s = statistics.median(time_calls(lambda: head(embed(ids)), device, repeats=5))
        peak = torch.cuda.max_memory_allocated(device) - base if cuda else 0
    model.to("cpu")
    return layer_s, other_s, int(peak)


def _run(trainer: Trainer, module: LightningModule, data: Any, mode: str) -> None:
    if mode == "predict":
        trainer.predict(module, data)
    elif mode == "fit":
        trainer.fit(module, data)
    else:
        fail(f"mode: {mode!r} is not a mode; use predict or fit")


def _plan_only(cfg: DictConfig, offload: OffloadConfig, console: Console) -> dict[str, Any]:
    with torch.device("meta"):
        model = instantiate(cfg.model)
    try:
        plan = plan_offload(model, offload)
    except LayerStackError as err:
        fail(str(err))
    console.print(render_plan(plan))
    folder = job_output_dir()
    if folder is not None:
        console.print(
            f"plan picture: {save_plan_picture(plan, folder / PLAN_PICTURE)}", soft_wrap=True
        )
    note_applied()  # planning only is what a dry run asks for: not a forgotten callback
    return {"backend": plan.backend, "device_bytes_saved": plan.device_bytes_saved}


def _summary(
    offload: OffloadConfig, callbacks: list[OffloadCallback], timer: StepTimer, trainer: Trainer
) -> dict[str, Any]:
    device = trainer.strategy.root_device
    stats = callbacks[0].last_stats if callbacks else None
    step_ms = timer.median_ms
    per_forward = stats.h2d_bytes_per_forward if stats is not None else None
    return {
        "backend": offload.resolved_backend,
        "config_hash": offload.compute_hash(),
        "device": str(device),
        "peak_device_bytes": (
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        ),
        "device_bytes_saved": stats.device_bytes_saved if stats is not None else 0,
        "device_bytes_saved_measured": stats.measured if stats is not None else False,
        "offloaded_bytes": stats.offloaded_bytes if stats is not None else 0,
        "stalls": stats.stalls if stats is not None else 0,
        "steps": len(timer.times_ms),
        "step_ms": step_ms,
        "h2d_gb_s": (per_forward / step_ms / 1e6) if per_forward and step_ms else None,
    }


def _saved_cell(summary: dict[str, Any]) -> str:
    """Device bytes saved, saying whether the allocator measured them or the plan says so."""
    saved = format_bytes(summary["device_bytes_saved"])
    if summary["backend"] == "none":
        return saved
    if summary.get("device_bytes_saved_measured"):
        return saved + " measured"
    return saved + (" planned, not measured" + (" (CPU)" if summary["device"] == "cpu" else ""))


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="Run summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    peak = summary["peak_device_bytes"]
    table.add_row("backend", summary["backend"])
    table.add_row("config hash", summary["config_hash"])
    table.add_row("device", summary["device"])
    table.add_row(
        "peak device memory", "not measured (CPU)" if peak is None else format_bytes(peak)
    )
    table.add_row("device bytes saved", _saved_cell(summary))
    shared_by = summary.get("host_shared_by", 1)
    if shared_by > 1:
        table.add_row(
            "host memory shared",
            f"{format_bytes(summary['host_bytes_shared'])} by {shared_by} processes of this node",
        )
    table.add_row("steps", str(summary["steps"]))
    step_ms = summary["step_ms"]
    table.add_row("time per step (median)", "-" if step_ms is None else f"{step_ms:.2f} ms")
    gbs = summary["h2d_gb_s"]
    table.add_row("H2D throughput", "-" if gbs is None else f"{gbs:.3f} GB/s")
    table.add_row("prefetch stalls", str(summary["stalls"]))
    if "predicted_step_ms" in summary:
        table.add_row("predicted time per forward", f"{summary['predicted_step_ms']:.2f} ms")
    return table
