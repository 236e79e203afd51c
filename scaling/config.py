"""What all stages share about configs: the error type for bad input, the check of every field
whose value can be judged without data or devices, and what a broken config file or override says.

`check_fields` runs for every trial of a sweep before the first one trains (train.check_config),
so a bad value costs seconds, not the trials before it. It reads the config and nothing else: no
JAX, no data. A field a config does not have is skipped: the schema lives in the config files.
`load_file` and `override_problem` turn what ml_collections raises while parsing --config and
--config.<field> (a traceback) into one line; `parse_flags`, the flag parser of the entry points
(main.py, launch.py), calls them when that parsing fails.
"""
import difflib
import importlib.util
import math
import os
import re
import sys
import tempfile
import traceback

from absl import flags
import ml_collections


class ConfigError(ValueError):
  """Bad user input, reported as one line naming the field and the fix (never a JAX traceback)."""


# Seeds become 64-bit random keys after an offset per random stream is added.
MAX_SEED = 2**62

# Every evaluation logs <split>/error and <split>/loss for these splits (when they are not empty).
EVAL_SPLITS = ("valid", "test", "train_eval")
EVAL_METRICS = ("error", "loss")


def check_workdir(workdir: str) -> None:
  """A workdir that is empty, a file, or where nothing can be created fails before anything runs."""
  if not workdir:
    raise ConfigError("--workdir is empty: give the directory for the outputs, e.g."
                      " --workdir=runs/x")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"--workdir={workdir}: {existing} is a file, not a directory:"
                      " choose another --workdir")
  try:   # os.access says yes to root even on read-only mounts: try it
    tempfile.TemporaryFile(dir=existing).close()
  except OSError as error:
    raise ConfigError(f"--workdir={workdir} is not writable ({error.strerror} in {existing}):"
                      " choose a directory you can write to") from None


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fraction(x) -> bool:     # [0, 1)
  return _finite(x) and 0 <= x < 1


# (dotted field, test of its value, what a valid value is). Ordered as the config files are.
_RULES = (
    ("dataset.placement", lambda x: x in ("auto", "device", "host"),
     "'auto' (host when the train set is large), 'device' or 'host'"),
    ("dataset.device_fraction", lambda x: _finite(x) and 0 < x <= 1,
     "a number in (0, 1]: auto places the train set on the host above this share of a device's"
     " memory"),
    ("batch_size", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("reference_batch_size", lambda x: _int(x) and x >= 1,
     "an integer >= 1: the batch size at which lr = base_lr"),
    ("base_lr", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("lr_multiplier", lambda x: _finite(x) and x > 0,
     "a finite number > 0: it multiplies the rule's learning rate (e.g. sweep.lr_multiplier=(0.5,"
     " 1.0, 2.0))"),
    ("seed", lambda x: _int(x) and 0 <= x < MAX_SEED,
     "an integer in [0, 2**62): random keys are made from it and offsets of it"),
    ("lr_power", _finite, "a finite number"),
    ("warmup.length", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("warmup.init_fraction", lambda x: _finite(x) and 0 <= x <= 1,
     "a number in [0, 1]: warmup starts at init_fraction * lr"),
    ("decay.final_fraction", lambda x: _finite(x) and 0 <= x <= 1,
     "a number in [0, 1]: the decay ends at final_fraction * lr"),
    ("decay.factor", lambda x: _finite(x) and x > 0, "a finite number > 0 (0.1 = divide by 10)"),
    ("budget.length", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("eval_every.length", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("optimizer.momentum", _fraction, "a number in [0, 1)"),
    ("optimizer.weight_decay", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("optimizer.b1", _fraction, "a number in [0, 1)"),
    ("optimizer.b2", _fraction, "a number in [0, 1)"),
    ("optimizer.eps", lambda x: _finite(x) and x > 0,
     "a finite number > 0 (Adam divides by sqrt(v) + eps, and v is 0 for a dead unit)"),
    ("optimizer.trust_coefficient", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("target.value", _finite, "a finite number"),
    ("divergence.loss_multiple", lambda x: _finite(x) and (x == 0 or x > 1),
     "a finite number > 1 (or 0: only a non-finite loss counts as divergence)"),
    ("eval_batch_size", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("train_eval_size", lambda x: _int(x) and x >= 0,
     "an integer >= 0 (0 = no train_eval split)"),
    ("log_every_steps", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("num_devices", lambda x: _int(x) and x >= 0, "an integer >= 0 (0 = every visible device)"),
    ("grad_groups", lambda x: _int(x) and x >= 1,
     "an integer >= 1 that divides batch_size (1 = no noise-scale estimate)"),
    ("noise_scale.ema_decay", _fraction, "a number in [0, 1)"),
    ("curvature.every_steps", lambda x: _int(x) and x >= 0,
     "an integer >= 0 (0 = only at the end)"),
    ("curvature.subset_size", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("curvature.scheduled", lambda x: x in ("all", "top_eigenvalue"),
     "'all' or 'top_eigenvalue' (what the every_steps measurements compute)"),
    ("curvature.max_probes", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("curvature.min_probes", lambda x: _int(x) and x >= 2,
     "an integer >= 2 (the standard error of the trace needs two probes)"),
    ("curvature.probe_chunk", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("curvature.trace_tol", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("curvature.lanczos_steps", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("curvature.top_k", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("curvature.sharpness_eps", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("curvature.sharpness_steps", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("curvature.density_starts", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("curvature.density_steps", lambda x: _int(x) and x >= 1, "an integer >= 1"),
    ("vectorize_trials", lambda x: _int(x) and x >= 0,
     "an integer >= 0: the most trials one vmapped program trains (0 or 1 = off)"),
    ("checkpoint.every_steps", lambda x: _int(x) and x >= 0,
     "an integer >= 0 (0 = only at the end)"),
    ("checkpoint.keep", lambda x: _int(x) and x >= 1, "an integer >= 1 (checkpoints kept on disk)"),
)

_MISSING = object()


def _get(config, dotted: str):
  node = config
  for name in dotted.split("."):
    if not hasattr(node, "keys") or name not in node:
      return _MISSING
    node = node[name]
  return node


def logged_metrics(config) -> list[str]:
  """The metrics every evaluation of this config logs: the names a target may use."""
  # A language model (text data) logs bits per character too; its validation split is whole
  # works chosen by the data set's builder, whatever dataset.validation_size says.
  text = _get(config, "model.name") == "transformer"
  sizes = {"valid": 1 if text else _get(config, "dataset.validation_size"), "test": 1,
           "train_eval": _get(config, "train_eval_size")}
  metrics = EVAL_METRICS + (("bpc",) if text else ())
  return [f"{split}/{metric}" for split in EVAL_SPLITS for metric in metrics
          if not (_finite(sizes[split]) and sizes[split] <= 0)]


def check_fields(config) -> None:
  """Raises ConfigError naming the first field whose value no trial could run with correctly."""
  for field, valid, what in _RULES:
    value = _get(config, field)
    if value is not _MISSING and not valid(value):
      raise ConfigError(f"{field}={value!r} is invalid: use {what}")
  widths = _get(config, "model.widths")
  if widths is not _MISSING and not (isinstance(widths, (tuple, list)) and
                                     all(_int(w) and w >= 1 for w in widths)):
    raise ConfigError(f"model.widths={widths!r} is invalid: use a tuple of integers >= 1"
                      " (the hidden layer widths; () = no hidden layer)")
  boundaries = _get(config, "decay.boundaries")
  if boundaries is not _MISSING and not (isinstance(boundaries, (tuple, list)) and
                                         all(_finite(b) and 0 <= b <= 1 for b in boundaries)):
    raise ConfigError(f"decay.boundaries={boundaries!r} is invalid: use a tuple of fractions in"
                      " [0, 1] of the steps after warmup")
  top_k, steps = _get(config, "curvature.top_k"), _get(config, "curvature.lanczos_steps")
  if top_k is not _MISSING and steps is not _MISSING and top_k > steps:
    raise ConfigError(f"curvature.top_k={top_k} is more than curvature.lanczos_steps={steps}:"
                      " Lanczos finds at most one eigenvalue per step; lower top_k or raise"
                      " lanczos_steps")
  metric = _get(config, "target.metric")
  if metric is not _MISSING and metric not in logged_metrics(config):
    raise ConfigError(f"target.metric={metric!r} is never logged by this trial: use one of"
                      f" {', '.join(logged_metrics(config))}")


def _one_line(text) -> str:
  return " ".join(str(text).split())


def _raised(error: BaseException, path: str) -> str:
  """'NameError: name 'x' is not defined (line 3)': the error and its line in the config file."""
  if isinstance(error, SyntaxError) and error.lineno:
    return f"SyntaxError: {error.msg} (line {error.lineno})"
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  where = f" (line {lines[-1]})" if lines else ""
  return _one_line(f"{type(error).__name__}: {error}{where}")


def load_file(spec: str) -> ml_collections.ConfigDict:
  """--config=PATH[:ARG] -> get_config(ARG), or ConfigError saying what is wrong with the file."""
  path, *args = spec.split(":", 1)
  flag = f"--config={spec}"
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "no such file"
    colon = (f" (a ':' ends the file's path: {path!r} is the file, {args[0]!r} the argument of"
             " its get_config; a path holding ':' cannot be given, rename or link the file)"
             if args else "")
    raise ConfigError(f"{flag}: {what}{colon}: give the path of a config .py file, e.g."
                      " --config=configs/mnist.py")
  if not path.endswith(".py"):
    raise ConfigError(f"{flag} is not a Python file: a config is a .py file whose get_config()"
                      " returns an ml_collections.ConfigDict, e.g. configs/mnist.py")
  module_spec = importlib.util.spec_from_file_location("scaling_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except (Exception, SystemExit) as error:  # the file runs user code: what it raises is its fault
    raise ConfigError(f"{flag} fails to load: {_raised(error, path)}: fix the file") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{flag} has no get_config(): define get_config() returning an"
                      " ml_collections.ConfigDict (see configs/mnist.py)")
  try:
    config = module.get_config(*args)
  except (Exception, SystemExit) as error:
    raise ConfigError(f"{flag}: get_config() raised {_raised(error, path)}: fix the file"
                      ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{flag}: get_config() returned {type(config).__name__}, not an"
                      " ml_collections.ConfigDict: return one (see configs/mnist.py)")
  return config


def _leaf_names(node, prefix="") -> list[str]:
  names = []
  for key, value in node.items():
    names += (_leaf_names(value, f"{prefix}{key}.") if isinstance(value, ml_collections.ConfigDict)
              else [f"{prefix}{key}"])
  return names


def override_problem(config, dotted: str, spec: str) -> str | None:
  """What is wrong with --config.<dotted> for `config` (loaded from `spec`), or None if nothing is.

  The config is locked: an override can change a field, never add one. That includes sweep axes:
  `--config.sweep.batch_size=...` works only when the config file's sweep has a batch_size axis.
  """
  node, path = config, []
  for name in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"--config.{dotted}: {'.'.join(path)} is one value ({type(node).__name__}), not a"
              f" group of fields: override --config.{'.'.join(path)} itself")
    if name not in node:
      if path and path[0] in ("sweep", "sweep_zip"):
        axes = ", ".join(_leaf_names(config[path[0]])) or "none"
        return (f"--config.{dotted}: {spec} has no {path[0]} axis {dotted.split('.', 1)[1]!r}"
                f" (its axes: {axes}); the command line can change an axis the config file"
                f" defines, not add one: add it to {path[0]} in a copy of the config file, or use"
                " a config that sweeps it (e.g. configs/mnist_sweep.py)")
      close = difflib.get_close_matches(name, list(node.keys()), n=1)
      hint = (f"did you mean --config.{'.'.join(path + close)}?" if close else
              f"the fields{' of ' + '.'.join(path) if path else ''} are {', '.join(node.keys())}")
      return f"--config.{dotted}: {spec} has no field {'.'.join(path + [name])!r}: {hint}"
    node, path = node[name], path + [name]
  return None


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config in argv (ml_collections' own rule: `--config=X` or `--config X`)."""
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(=|$)(.*)", arg)
    if match:
      return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return None


def _explain(error: Exception | None, argv: list[str]) -> str:
  """One line for a failed parse of the flags: the config file, else an override, else absl's."""
  spec = _config_spec(argv)
  if not spec:
    return "--config is required: pass a config file, e.g. --config=configs/mnist.py"
  try:
    config = load_file(spec)
  except ConfigError as bad_file:
    return str(bad_file)
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    problem = match and override_problem(config, match.group(1), spec)
    if problem:
      return problem
  message = str(error or "the config did not load").strip().splitlines()[0]
  if message.startswith("flag --workdir=None"):
    return "--workdir is required: pass the directory for the outputs, e.g. --workdir=runs/x"
  field = re.match(r"flag --config\.([\w.]+)=", message)
  if field:   # a value of the wrong type: say what the field holds
    value = config
    for name in field.group(1).split("."):
      value = value[name]
    message += (f": {field.group(1)} takes {type(value).__name__} values (the config file has"
                f" {value!r})")
  return message


def repeated_override(config, argv: list[str]) -> str | None:
  """A tuple --config.<field> given twice: ml_collections joins the two into one axis ('(0,1)'
  then '(0,)' sweeps seeds 0, 1, 0), where for any other field the last value counts."""
  seen = set()
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if match and match.group(1) in seen and isinstance(_get(config, match.group(1)),
                                                         (tuple, list)):
      return (f"--config.{match.group(1)} is given twice: give it once, with the value you"
              " mean (a tuple lists every value of an axis)")
    if match:
      seen.add(match.group(1))
  return None


def axis_overridden(config, argv: list[str]) -> str | None:
  """What is wrong when a --config.<field> in argv is a field a sweep axis sets in every trial
  (the override would be silently replaced by the axis values), or None."""
  axes = {}
  for group in ("sweep", "sweep_zip"):
    if isinstance(_get(config, group), ml_collections.ConfigDict):
      axes.update({name: group for name in _leaf_names(config[group])})
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if match and match.group(1) in axes:
      field, group = match.group(1), axes[match.group(1)]
      return (f"--config.{field}: every trial takes {field} from the {group} axis"
              f" {group}.{field}, so this value would be ignored: set the axis instead, e.g."
              f" --config.{group}.{field}='({config[group][field][0]!r},)'")
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)` in a module that defines a
  --config flag), with every error of --config and --config.<field> as one line. Refuses what
  would be silently ignored: a positional argument, a field that a sweep axis sets."""
  try:
    rest = flags.FLAGS(argv)
    # ml_collections defers an unreadable config file's error to the first use of the config.
    loaded = isinstance(flags.FLAGS["config"].value, ml_collections.ConfigDict)
    error = None
  except (Exception, SystemExit) as parse_error:  # the config file runs here: what it raises
    loaded, error = False, parse_error             # (sys.exit included) is bad input
  if not loaded:
    sys.exit(f"config error: {_explain(error, argv)}")
  if rest[1:]:
    sys.exit(f"config error: unexpected argument {rest[1]!r}: every option is a flag,"
             " --name=value (a value with spaces goes in quotes)")
  problem = repeated_override(flags.FLAGS["config"].value, argv) or axis_overridden(flags.FLAGS["config"].value, argv)
  if problem:
    sys.exit(f"config error: {problem}")
  return rest


def parse_tool_flags(argv: list[str], tool: str, usage: str, workdir_help: str) -> list[str]:
  """The flag parser of the tools that read a workdir (report, status, measure_checkpoint): a
  bad flag, a positional argument or no --workdir is one line naming it, with the usage."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    sys.exit(f"{tool}: {error} (usage: {usage})")
  if rest[1:]:
    sys.exit(f"{tool}: unexpected argument {rest[1]!r}: every option is a flag, --name=value"
             f" (usage: {usage})")
  if flags.FLAGS.workdir is None:
    sys.exit(f"{tool}: --workdir is required: {workdir_help} (usage: {usage})")
  return rest
