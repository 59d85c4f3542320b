"""Where hydra-offload meets the frameworks: each module here imports one of them, and the
core (config, plan, backends, runtime) imports none of these.

- :mod:`~hydra_offload.integrations.hydra`: the ``offload`` group's schema in Hydra's
  ConfigStore.
- :mod:`~hydra_offload.integrations.hydra_callback`: the job callback the group adds (checks
  at job start and end).
- :mod:`~hydra_offload.integrations.lightning`: :class:`OffloadCallback` for a Lightning
  ``Trainer``.
- :mod:`~hydra_offload.integrations.sweep`: the multirun summary (``SweepSummary``) and the
  per-job summary file.
- :mod:`~hydra_offload.integrations.job`: the job ``run.py`` runs.

A new integration (another trainer, another launcher) is a new module here, built on
:func:`~hydra_offload.apply_offload` and :func:`~hydra_offload.plan_offload`.
"""
