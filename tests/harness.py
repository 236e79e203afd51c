"""`python -m scaling.main` with test hooks, so that fault tests are deterministic, not races.

    python tests/harness.py --config=... --workdir=... [more scaling.main flags]

Hooks, from environment variables (none set: exactly scaling.main):
  SCALING_TEST_SIGNAL=STEP:SIG             the process sends itself SIG (TERM, INT, KILL) when the
                                           loop polls for a stop at chunk boundary STEP
  SCALING_TEST_SIGNAL_AFTER_SAVE=STEP:SIG  ... right after the checkpoint of STEP is complete
  SCALING_TEST_FAIL=TRIAL_ID               train.run raises RuntimeError for that trial
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from scaling import main  # noqa: E402
from scaling.training import checkpoint, loop, train


def _parse(value: str) -> tuple[int, signal.Signals]:
  step, name = value.split(":")
  return int(step), signal.Signals[f"SIG{name}"]


def _send(sig: signal.Signals) -> None:
  """Signals this process; Python runs the handler during the sleep (or right after it)."""
  os.kill(os.getpid(), sig)
  time.sleep(0.05)


def install() -> None:
  if "SCALING_TEST_SIGNAL" in os.environ:
    at, sig = _parse(os.environ["SCALING_TEST_SIGNAL"])
    requested = loop.StopRequest.requested

    def requested_at(self, step):
      if step == at and self.signal is None:
        _send(sig)
      return requested(self, step)
    loop.StopRequest.requested = requested_at

  if "SCALING_TEST_SIGNAL_AFTER_SAVE" in os.environ:
    at, sig = _parse(os.environ["SCALING_TEST_SIGNAL_AFTER_SAVE"])
    save = checkpoint.Checkpoints.save

    def save_then_signal(self, step, state, bookkeeping):
      save(self, step, state, bookkeeping)
      if step == at:
        self.wait()
        _send(sig)
    checkpoint.Checkpoints.save = save_then_signal

  if "SCALING_TEST_FAIL" in os.environ:
    failing, run = os.environ["SCALING_TEST_FAIL"], train.run

    def run_or_fail(config, workdir, trial_id="trial", sweep_axes=None):
      if trial_id == failing:
        raise RuntimeError(f"injected failure of {trial_id}\nsecond line of the message")
      return run(config, workdir, trial_id, sweep_axes)
    train.run = run_or_fail


if __name__ == "__main__":
  install()
  app.run(main.main)
