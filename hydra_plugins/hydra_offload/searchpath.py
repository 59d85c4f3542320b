"""Makes the ``offload`` config group visible to every Hydra app once hydra-offload is installed.

Hydra imports every module under the ``hydra_plugins`` namespace package before it composes
a config; importing this one registers the group's hidden configs in the ConfigStore (the
schema, and the entry that adds the job callback to ``hydra.callbacks``; see
:mod:`hydra_offload.integrations.hydra`), and the plugin class appends the package's YAML
files to the config search path.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from hydra_offload.integrations.hydra import explain_missing_offload_field, register_configs

register_configs()
explain_missing_offload_field()


class HydraOffloadSearchPathPlugin(SearchPathPlugin):
    """Appends ``pkg://hydra_offload.conf`` (provider ``hydra-offload``) to the search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="hydra-offload", path="pkg://hydra_offload.conf")
