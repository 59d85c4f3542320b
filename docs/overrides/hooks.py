"""MkDocs hooks of the docs build: the pictures the pages show, made from the project itself.

``img/offload_plan.png`` is the plan of the main job the pages run
(``python run.py offload=prefetch offload.prefetch.offload_group_size=8``): its config is
composed from ``conf/`` as ``run.py`` composes it, the module is built on the meta device (a
plan reads shapes only) and :func:`hydra_offload.pictures.save_plan_picture` draws it.
``img/offload_timeline.png`` is the timeline of one forward of that model with those
settings, traced on the machine that builds the docs (its CPU, unless it has a GPU the model
is not moved to: wall times). Both are drawn at every build, so they cannot drift from the
code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

PLAN_OVERRIDES = ["offload=prefetch", "offload.prefetch.offload_group_size=8"]
GENERATED = ("img/offload_plan.png", "img/offload_timeline.png")
"""The files the build adds under ``docs/`` (pages may link to them; they are not in git)."""
ROOT = Path(__file__).resolve().parents[2]


def main_job_plan_png() -> bytes:
    """The PNG of the main job's plan with :data:`PLAN_OVERRIDES`."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from hydra_offload import plan_offload
    from hydra_offload.models import LitDecoderLM
    from hydra_offload.pictures import save_plan_picture

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="config", overrides=PLAN_OVERRIDES)
    with torch.device("meta"):
        module = LitDecoderLM(instantiate(cfg.model), lr=cfg.lr)
    plan = plan_offload(module, cfg.offload)
    with tempfile.TemporaryDirectory() as folder:
        return save_plan_picture(plan, Path(folder) / "plan.png").read_bytes()


def main_job_timeline_png() -> bytes:
    """The PNG of the timeline of one forward of the main job's model (its real weights, on
    this machine's CPU: wall times) under :data:`PLAN_OVERRIDES`, after a warm-up forward."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from hydra_offload import apply_offload
    from hydra_offload.pictures import save_timeline_picture

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="config", overrides=PLAN_OVERRIDES)
    torch.manual_seed(cfg.data.seed)
    model = instantiate(cfg.model).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len))
    with torch.no_grad(), apply_offload(model, cfg.offload) as handle:
        model(ids)  # warm-up
        with handle.trace() as trace:
            model(ids)
    with tempfile.TemporaryDirectory() as folder:
        return save_timeline_picture(trace, Path(folder) / "timeline.png").read_bytes()


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pictures to the site's files (pages link to them as usual)."""
    from mkdocs.structure.files import File

    plan, timeline = GENERATED
    files.append(File.generated(config, plan, content=main_job_plan_png()))
    files.append(File.generated(config, timeline, content=main_job_timeline_png()))
    return files
