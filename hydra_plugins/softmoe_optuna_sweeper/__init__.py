"""This package's Hydra plugin (Hydra instantiates plugins only from the ``hydra_plugins`` namespace)."""
