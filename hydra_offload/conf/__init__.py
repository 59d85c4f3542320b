"""Package data: the ``offload`` config group, found by Hydra as ``pkg://hydra_offload.conf``."""
