"""scaling: large-batch scaling studies in JAX."""
