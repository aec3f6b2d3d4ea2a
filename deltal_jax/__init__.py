"""deltal_jax: RLVR for language models in JAX/Flax, built around ΔL Normalization."""
