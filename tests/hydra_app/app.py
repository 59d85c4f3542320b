"""A Hydra app that knows nothing of hydra-offload: it never imports the package.

The tests run it in a subprocess to show that an installed hydra-offload makes the
``offload`` group and its schema available to any Hydra app, through the plugin alone.
"""

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))


if __name__ == "__main__":
    main()
