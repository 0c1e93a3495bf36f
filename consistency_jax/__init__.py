"""consistency_jax: training consistency models in JAX/Flax."""
