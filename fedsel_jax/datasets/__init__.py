"""Dataset sources. Each ``load_<name>(config) -> fedsel_jax.datasets.base.Dataset``."""
