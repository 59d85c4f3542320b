"""The hydra-offload main job: the embedded model under a Lightning Trainer.

    python run.py                                   # predict, no offload
    python run.py offload=prefetch offload.prefetch.offload_group_size=8
    python run.py offload=uva offload.uva.cpu_offload_gb=0.01 mode=fit
    python run.py model=llama_7b_meta offload=prefetch     # plan only: the model is on meta
    python run.py +dry_run=true offload=prefetch           # plan only, any model
    python run.py -m offload=none,uva,prefetch                 # a sweep: 3 jobs
    python run.py -m offload=prefetch offload.prefetch.offload_group_size=2,4,8
    python run.py -m hydra/sweeper=optuna objective=step_time offload=prefetch \
        'offload.prefetch.offload_group_size=range(2,5)'   # an Optuna study

See :mod:`hydra_offload.integrations.job` for what the job does and prints. A bad setting ends
it with one line naming the key, the value and what is allowed, and exit status 2. A multirun ends
with ``sweep_summary.md``, ``.csv`` and ``.png`` in the sweep directory. With ``objective``
set the job returns the figure it names, for the sweeper to minimize.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

if TYPE_CHECKING:
    from hydra_offload.integrations.job import JobResult


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> JobResult:
    # Imported here, not above: torch and Lightning take seconds to import, and the offload
    # group's checks at job start (a bad key or value: one line, exit status 2) come first.
    from hydra_offload.integrations.job import run_job

    return run_job(cfg)


if __name__ == "__main__":
    main()
