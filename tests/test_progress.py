"""Console progress (scaling/training/progress.py): the ETA arithmetic with measured evaluation and
curvature costs, the sweep's counts and ETA, line-oriented output unless stdout is a terminal."""
import io

import pytest

from scaling.training import progress


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize("step,total,every,expected", [
    (0, 10, 3, 4),    # at 3, 6, 9 and the end (10)
    (9, 10, 3, 1),    # the end only
    (10, 10, 3, 0),
    (0, 12, 3, 4),    # 12 is a multiple: the end is the 4th
    (5, 12, 0, 1),    # no schedule: the end only
])
def test_evaluations_left(step, total, every, expected):
  assert progress.evaluations_left(step, total, every) == expected


def trial_progress(stream, clock, **kwargs):
  return progress.TrialProgress(8, 30, 0, eval_every=3, curvature_every=15, stream=stream,
                                clock=clock, **kwargs)


def test_trial_eta_counts_evaluation_and_curvature_at_their_measured_cost():
  clock, out = FakeClock(), io.StringIO()
  tracker = trial_progress(out, clock)

  def costs(seconds):
    def fn():
      clock.now += seconds
    return fn
  evaluate = tracker.timed("evaluation", costs(0.5))
  measure = tracker.timed("curvature", costs(4.0))
  tracker.segment(3, 3, 10.0, 1.0)   # compiles: left out of the steady state once there is more
  # Nothing else measured yet: 27 steps at 0.3/s, and a lower bound that says what it lacks.
  assert out.getvalue() == ("step 3/30  loss 1.0000  2 examples/s  eta >=1m30s (train 1m30s;"
                            " + evaluation (not measured yet); + curvature (not measured yet))\n")
  evaluate()
  measure()
  tracker.segment(6, 3, 1.5, 0.9)    # 2 steps/s
  evaluate()
  # 24 steps at 2/s = 12 s; evaluations at 9..30 = 8 x 0.5 s; curvature at 15 and 30 = 2 x 4 s.
  assert tracker.eta(6) == {"train": 12.0, "evaluation": 4.0, "curvature": 8.0, "total": 24.0}
  last = out.getvalue().splitlines()[-1]
  assert last == ("step 6/30  loss 0.9000  16 examples/s  eta 24s (train 12s, evaluation 4s,"
                  " curvature 8s)")
  assert "\r" not in out.getvalue() and out.getvalue().count("\n") == 2   # a file: whole lines


def test_stop_at_target_says_the_eta_is_to_the_cap_and_a_terminal_gets_a_bar():
  clock, out = FakeClock(), Terminal()
  tracker = trial_progress(out, clock, stop_at_target=True)
  tracker.timed("evaluation", lambda: None)()
  tracker.timed("curvature", lambda: None)()
  tracker.segment(15, 15, 3.0, 1.0)
  assert out.getvalue().startswith("\r[##########..........] step 15/30")
  assert "eta <=3s (train 3s, evaluation 0s, curvature 0s; to the cap, unless it reaches the" \
      " target)" in out.getvalue()
  tracker.close()
  assert out.getvalue().endswith("\n")


def test_sweep_eta_from_trials_of_the_same_batch_size_skips_finished_ones():
  clock, out = FakeClock(), io.StringIO()
  sweep = progress.SweepProgress([16, 32, 16, 32, 16, 64], finished={3}, stream=out, clock=clock)
  sweep.start(0, "[0] a")
  assert out.getvalue() == ("[0] a: training  |  sweep: trial 1 of 6; done 0, skipped 0, diverged"
                            " 0, failed 0; eta ? (after the first trial)\n")
  clock.now = 10.0
  sweep.end("done")
  sweep.start(1, "[1] b")
  # Only the first trial measured: it stands for every trial, 10 s each; the finished one is free.
  assert sweep.eta() == 40.0
  clock.now = 14.0
  sweep.end("diverged")
  sweep.start(2, "[2] c")
  clock.now = 17.0
  # The first trial (10 s, with the process's one-time costs) no longer counts; no other bs=16
  # trial ran, so the latest (4 s) stands for each. Current: min(its own ETA, 4 s - 3 s elapsed);
  # then bs=16 and bs=64, 4 s each; the finished bs=32 trial costs nothing.
  assert sweep.eta(current_left=5.0) == 9.0
  assert sweep.eta(current_left=0.5) == 8.5
  assert sweep.status(current_left=5.0) == (
      "sweep: trial 3 of 6; done 1, skipped 0, diverged 1, failed 0; eta 9s")
  assert progress.SweepProgress.current is sweep
  sweep.end("failed")
  sweep.leave()
  assert progress.SweepProgress.current is None
  sweep.skip(3)
  assert sweep.counts == {"done": 1, "diverged": 1, "failed": 1, "skipped": 1}


def test_trial_lines_carry_the_sweep_status():
  clock, out = FakeClock(), io.StringIO()
  sweep = progress.SweepProgress([8, 8], finished=set(), stream=io.StringIO(), clock=clock)
  sweep.start(0, "[0] a")
  try:
    tracker = trial_progress(out, clock)
    tracker.timed("evaluation", lambda: None)()
    tracker.timed("curvature", lambda: None)()
    tracker.segment(15, 15, 3.0, 1.0)
  finally:
    sweep.leave()
  assert out.getvalue().endswith("|  sweep: trial 1 of 2; done 0, skipped 0, diverged 0, failed 0;"
                                 " eta ? (after the first trial)\n")


def test_duration():
  assert [progress.duration(s) for s in (None, 9.4, 125, 3725)] == ["?", "9s", "2m05s", "1h02m"]


def test_sweep_estimate_takes_the_median_at_the_same_batch_size():
  sweep = progress.SweepProgress([], finished=set(), stream=io.StringIO())
  sweep.measured = [(16, 30.0), (16, 9.0), (32, 5.0), (16, 12.0), (64, 2.0), (16, 11.0)]
  assert sweep.estimate(16) == 11.0          # median of 9, 12, 11 (the first left out)
  assert sweep.estimate(128) == 11.0         # unseen: median of the latest three (12, 2, 11)


def test_a_cost_is_the_median_of_the_latest_calls_after_the_compiling_first():
  clock = FakeClock()
  tracker = trial_progress(io.StringIO(), clock)
  for seconds in (5.0, 0.5, 0.7, 0.6):
    def call(seconds=seconds):
      clock.now += seconds
    tracker.timed("evaluation", call)()
    if seconds == 5.0:
      assert tracker.cost == {"evaluation": 5.0}   # alone, the compiling call stands for all
  assert tracker.cost == {"evaluation": pytest.approx(0.6)}


def test_a_trial_that_stops_at_its_target_counts_to_the_extrapolated_crossing():
  clock, out = FakeClock(), io.StringIO()
  tracker = progress.TrialProgress(8, 300, eval_every=10, stop_at_target=True,
                                   target=("valid/error", 0.04), stream=out, clock=clock)

  def evaluate(error):
    clock.now += 1.0
    return {"valid/error": error}
  evaluate = tracker.timed("evaluation", evaluate)
  for step, seconds in ((10, 10.0), (20, 5.0), (30, 5.0)):
    tracker.segment(step, 10, seconds, 1.0)
    evaluate(0.5 * 10 / step)   # error = 5 / step: crosses 0.04 at step 125
  assert tracker.end_step() == 125
  # To the evaluation at 130 that sees it: 100 steps at 2/s; evaluations at 40..130, 1 s each.
  assert tracker.eta(30) == {"train": 50.0, "evaluation": 10.0, "total": 60.0}
  assert tracker.line(30, 1.0).endswith(
      "eta 1m00s (train 50s, evaluation 10s; to the target, extrapolated at step ~125)")
  tracker.evaluations = [(10, 0.1), (20, 0.2), (30, 0.3)]   # rising: no trend, back to the cap
  assert tracker.end_step() == 300
  # Falling so slowly that the crossing lies past any float (it overflowed math.exp and crashed a
  # trial of the default study): the cap.
  tracker.evaluations = [(10, 0.5), (20, 0.5 - 1e-12), (30, 0.5 - 2e-12)]
  assert tracker.end_step() == 300
