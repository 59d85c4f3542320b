"""A Hydra + Lightning app written like lightning-hydra-template's ``src/train.py``.

It never imports hydra-offload: the package reaches it only through ``- offload: none`` in
``conf/config.yaml`` and the ``OffloadCallback`` entry of ``conf/callbacks/default.yaml``.
The task prints ``task started`` first, so a test can tell whether it ran at all; torch and
Lightning (and ``stack.py``, the model) are imported inside it only to keep the runs that
never get there fast.

    python app.py offload=prefetch                     # offloads every second layer
    python app.py offload=prefetch callbacks=none      # no callbacks: nothing offloaded
    python app.py offload=prefetch +trainer.strategy=ddp_spawn trainer.devices=2
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(f"task started: {' '.join(HydraConfig.get().overrides.task)}", flush=True)
    import torch
    from lightning.pytorch import Trainer
    from stack import Stack
    from torch.utils.data import DataLoader, TensorDataset

    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    data = DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=2)
    trainer = Trainer(**cfg.trainer, callbacks=callbacks)
    outputs = trainer.predict(Stack(), data)
    print(f"predicted {len(outputs or [])} batches with {len(callbacks)} callback(s)", flush=True)


if __name__ == "__main__":
    main()
