"""What all stages share about configs: the error type for bad input."""


class ConfigError(ValueError):
  """Bad user input, reported as one line naming the field and the fix (never a JAX traceback)."""
