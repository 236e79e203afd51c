"""The stages import one another in one direction only, as each package's __init__ states: every
`import` in scaling/ (module level and inside functions) is read from the source."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scaling")

# A part of scaling -> the parts it may import (besides itself). Top-level modules are parts too.
MAY_IMPORT = {
    "config": set(),
    "streams": set(),
    "sharding": {"config"},
    "models": {"config"},
    "data": {"config", "sharding"},
    "measurement": {"config", "streams", "sharding", "models"},
    "training": {"config", "streams", "sharding", "models", "data", "measurement"},
    "analysis": {"config"},
    "sweep": {"config", "sharding", "training"},
    "cluster": {"config", "sharding", "sweep", "training", "analysis"},
    "measure_checkpoint": {"config", "streams", "sharding", "models", "measurement", "training",
                           "analysis"},
    "main": {"config", "sweep", "training", "cluster"},
    # `python -m scaling.report` etc.: runpy shims of the modules in their packages
    "report": set(), "launch": set(), "status": set(),
}
NEVER_JAX = ("analysis",)   # a report is written without JAX (tests/test_report.py runs it)


def parts():
  """(part, path) of every module in scaling/."""
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, ROOT).split(os.sep)
        part = rel[0][:-3] if len(rel) == 1 else rel[0]
        if part != "__init__":
          yield part, path


def imported(path):
  """Every module name an import statement of the file names (absolute imports only here)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}: relative import"
      for alias in node.names:
        yield f"{node.module}.{alias.name}" if node.module == "scaling" else node.module


def test_every_part_is_known():
  assert {part for part, _ in parts()} == set(MAY_IMPORT)


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_a_part_imports_only_the_parts_below_it(part):
  for name, path in parts():
    if name != part:
      continue
    for module in imported(path):
      if module.split(".")[0] == "jax" or module.startswith(("flax", "optax", "orbax")):
        assert part not in NEVER_JAX, f"{path} imports {module}"
      if module.split(".")[0] != "scaling" or module == "scaling":
        continue
      other = module.split(".")[1]
      assert other == part or other in MAY_IMPORT[part], (
          f"{os.path.relpath(path, ROOT)} imports {module}: {part} may import only"
          f" {sorted(MAY_IMPORT[part])}")


def test_the_parts_form_no_cycle():
  """MAY_IMPORT itself is a DAG, so the modules that obey it cannot import in a circle."""
  done, visiting = set(), set()

  def visit(part):
    assert part not in visiting, f"cycle through {part}"
    if part not in done:
      visiting.add(part)
      for other in MAY_IMPORT[part]:
        visit(other)
      visiting.discard(part)
      done.add(part)
  for part in MAY_IMPORT:
    visit(part)
