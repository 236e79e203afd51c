"""CPU steal: the share of a virtual machine's CPU time its host gave to other guests (`st` in top).

The 2-core machine these benchmarks were written on loses up to 40% of its CPUs this way for
minutes at a time, which slows whatever is timed then by as much: the benchmarks record it per run
and leave runs above STEAL_LIMIT out of their ratios where cleaner repeats exist.
"""

STEAL_LIMIT = 0.10


def cpu_ticks():
  """(steal, total) jiffies of all CPUs since boot from /proc/stat; None where there is none."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def steal_share(before, after):
  """The share of CPU time the hypervisor gave to other guests between two cpu_ticks(): time this
  machine's cores were taken away (a virtual machine's `st` in top); a rate measured under much
  of it is low for reasons outside the benchmark."""
  if not before or not after or after[1] == before[1]:
    return None
  return (after[0] - before[0]) / (after[1] - before[1])
