"""Memory planner: XLA's compiled memory analysis of one training step, per device, without
running it; the largest power-of-two batch that fits; a trial that cannot fit refused up front.

    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --plan_memory

Bytes = arguments + outputs - aliased (the donated state) + temporaries of the compiled step:
what XLA plans to hold at once on one device, its own number, not a model of it.
"""
from typing import Callable

import jax

from scaling.config import ConfigError

# (batch size, accumulation steps or None for the config's) -> per-device bytes of one step:
# train.step_memory_bytes bound to a config and its data.
BytesOf = Callable[[int, int | None], int]


def device_memory_bytes() -> int | None:
  """The first local device's memory limit, where the backend reports one (GPU, TPU; not CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def check_fits(bytes_of: BytesOf, batch_size: int, limit_bytes: int | None) -> None:
  """ConfigError (one line, with the estimate) when one step of the trial cannot fit."""
  if not limit_bytes:
    return
  needed = bytes_of(batch_size, None)
  if needed > limit_bytes:
    raise ConfigError(
        f"batch_size={batch_size} needs {needed / 2**20:,.1f} MiB per device for one"
        f" training step (XLA memory analysis), over the device's {limit_bytes / 2**20:,.1f} MiB:"
        " lower batch_size or raise accumulation_steps (see --plan_memory)")


def largest_power_of_two(bytes_of: BytesOf, devices: int, num_train: int, limit_bytes: int,
                         accumulation: bool) -> int | None:
  """The largest power-of-two batch (<= the training set) whose step fits `limit_bytes`; with
  `accumulation`, each batch may use accumulation_steps up to its per-device batch."""
  best, b = None, 1
  while b * devices <= num_train:
    batch = b * devices
    k = b if accumulation else 1
    try:
      fits = bytes_of(batch, k) <= limit_bytes
    except ConfigError:   # e.g. grad_groups that this batch cannot hold: try the next
      b *= 2
      continue
    if fits:
      best = batch
    elif not accumulation:
      break   # memory grows with the batch
    b *= 2
  return best


def plan(bytes_of: BytesOf, batch_sizes, devices: int, num_train: int,
         limit_bytes: int | None) -> list[str]:
  """The lines --plan_memory prints."""
  lines = [f"{'batch':>7}  {'MiB/device':>11}  fits"]
  for bs in batch_sizes:
    needed = bytes_of(bs, None)
    fits = "?" if not limit_bytes else ("yes" if needed <= limit_bytes else "NO")
    lines.append(f"{bs:>7}  {needed / 2**20:>11,.1f}  {fits}")
  if limit_bytes:
    lines.append(f"device memory: {limit_bytes / 2**20:,.1f} MiB")
    for acc in (False, True):
      best = largest_power_of_two(bytes_of, devices, num_train, limit_bytes, acc)
      lines.append(f"largest power-of-two batch that fits {'with' if acc else 'without'}"
                   f" gradient accumulation: {best}")
  else:
    lines.append("device memory: not reported by this backend (CPU): pass a limit to compare")
  return lines
