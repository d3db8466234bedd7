"""fedsel_jax: selective layer fine-tuning in federated learning, in JAX/Flax."""

__version__ = "0.1.0"
