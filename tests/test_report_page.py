"""The report page as a reader meets it: the findings paragraph computed from the numbers (and
saying what the data cannot support), captions, links to each trial, a partial sweep and a single
trial; and the page opened in a real headless Chromium, every image decoded."""
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from scaling.analysis import findings, report, results, study
from tests.test_report import write_trial

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)
IN_CI = os.environ.get("CI") == "true"


def best_row(bs, steps, perfect=False, outcome="reached"):
  return dict(batch_size=bs, steps_to_target=steps, perfect_scaling=perfect, outcome=outcome)


def test_regimes_from_the_best_steps():
  rows = [best_row(16, 1600, True), best_row(32, 820, True), best_row(64, 500),
          best_row(128, 300), best_row(256, 110), best_row(512, 100), best_row(1024, 118),
          best_row(2048, None, outcome="not reached")]
  # Flat: within 1.2x of the fewest (100) from the largest reached downwards; 300 is not.
  assert findings.regimes(rows, 1.2) == ([16, 32], [64, 128], [256, 512, 1024])
  # A single lowest point at the largest B is no plateau.
  assert findings.regimes(rows[:5] + [best_row(512, 50)], 1.2) == ([16, 32], [64, 128, 256, 512],
                                                                   [])
  # Steps that rise past their minimum (the default study: 70, 85, 93 at B = 2048, 4096, 8192) are
  # maximal data parallelism too: no larger batch size reduced them.
  rising = rows[:4] + [best_row(256, 96), best_row(512, 70), best_row(1024, 85),
                       best_row(2048, 93)]
  assert findings.regimes(rising, 1.2) == ([16, 32], [64, 128, 256], [512, 1024, 2048])


def test_power_law_exponent():
  assert findings.power_law([1, 4, 16], [3, 6, 12]) == pytest.approx(0.5)
  assert findings.power_law([8, 8], [1, 2]) is None


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  """S = 1000 (1 + 512/B) at B = 16..8192, 2 seeds x 2 LR multipliers (the slower one at x2),
  no curvature; one batch size that never reaches the target (censored)."""
  root = str(tmp_path_factory.mktemp("page"))
  for bs in [2**k for k in range(4, 14)]:
    for seed in (0, 1):
      write_trial(root, bs, seed=seed, mult=1.0, curvature=False)
      write_trial(root, bs, seed=seed, mult=2.0, slowdown=1.3, curvature=False)
  write_trial(root, 16384, mult=1.0, reach=False, curvature=False)
  return root


def test_findings_paragraph_matches_the_numbers(sweep_dir):
  trials = results.load_trials(sweep_dir)
  rows = study.best_per_batch(trials)
  (fit,) = study.fit_table(rows, replicates=200)
  text = " ".join(findings.findings(trials, rows, [fit], expected=41))
  # Examples within 1.2x of B = 16's while (B + 512)/528 <= 1.2: B <= 121; steps within 1.2x of
  # the fewest (B = 8192: 1062) while B >= 1862.
  assert "held up to B = 64;" in text
  assert "B = 128, 256, 512, 1024 gave diminishing returns (steps still fell at each" in text
  assert "from B = 2048 to 8192 no larger batch size reduced the steps by more than 1.2x" in text
  assert abs(fit["b_crit"] - 512) < 0.02 * 512
  assert f"B_crit = {fit['b_crit']:.3g} ± {fit['b_crit_err']:.2g}" in text
  assert "B = 16384 never reached the target within the step cap: censored" in text
  # The best LR is 0.1 sqrt(B/128) (multiplier 1) at every B.
  assert ("as B^0.50 within the perfect-scaling range (B = 16-64; nearest rule: square-root, "
          "B^0.5) and as B^0.50 beyond it (B = 128-8192;") in text
  # Multiplier 1 is the bottom of {1, 2} everywhere: unbracketed, said so.
  assert "edge of its grid at 10 of 10 batch sizes" in text
  assert "Curvature was not measured (curvature.enabled is off)" in text
  assert text.startswith("41 of 41 trials finished (41 done, 0 diverged).")


def test_findings_for_a_partial_sweep_and_a_single_trial(tmp_path):
  write_trial(str(tmp_path / "a"), 64)
  write_trial(str(tmp_path / "a"), 128, summary=False, stop_frac=0.3)
  write_trial(str(tmp_path / "a"), 256, status="failed", stop_frac=0.3)
  trials = results.load_trials(str(tmp_path / "a"))
  rows = study.best_per_batch(trials)
  text = " ".join(findings.findings(trials, rows, study.fit_table(rows, 50), expected=5))
  assert text.startswith("1 of 5 trials finished (1 done, 0 diverged); 1 running, 1 failed, 2 not"
                         " started: every number below may still change.")
  assert "B = 128, 256 have not reached it yet" in text
  assert "No critical batch size could be fitted: needs >= 2 distinct batch sizes" in text
  _, reached = write_trial(str(tmp_path / "b"), 128, flat=True)
  (t,) = results.load_trials(str(tmp_path / "b"))
  assert findings.findings([t], [], [])[1].startswith(
      f"One trial (B = 128, lr = 0.1, status done): it reached valid/error < 0.01 at step"
      f" {reached} (interpolated ")


def open_in_chromium(html_path, out_dir):
  """Loads the page (images included) in headless Chromium; a script run at 'load' writes what it
  found into the DOM: each <img> that did not decode, and where the findings and first figure sit
  on a 1280x900 first screen. Returns (that record, the DOM, a screenshot path)."""
  probe = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
           "const top=s=>{const e=document.querySelector(s);return e?Math.round("
           "e.getBoundingClientRect().top):null};const r={images:imgs.length,broken:imgs.filter("
           "i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.getAttribute('src')),findings:top("
           "'.findings'),figure:top('figure'),screen:window.innerHeight};const p=document."
           "createElement('pre');p.id='probe';p.textContent=JSON.stringify(r);document.body."
           "appendChild(p);});</script>")
  page = html_path.replace(".html", "_probe.html")
  with open(html_path) as f, open(page, "w") as g:
    g.write(f.read().replace("</body>", probe + "</body>"))
  shot = os.path.join(out_dir, "first_screen.png")
  with tempfile.TemporaryDirectory() as profile:
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", f"file://{page}"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    subprocess.run(flags + [f"--screenshot={shot}", f"file://{html_path}"], capture_output=True,
                   timeout=120, check=True)
  found = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom)
  assert found, "the page's load handler never ran: " + dom[-500:]
  return json.loads(found.group(1).replace("&quot;", '"')), dom, shot


@pytest.mark.heavy   # a headless browser start and render: ~20 s; CI's second pass
@pytest.mark.skipif(CHROMIUM is None and not IN_CI,
                    reason="no chromium (apt-get install chromium); required under CI=true")
def test_page_renders_in_headless_chromium_without_missing_images(tmp_path):
  assert CHROMIUM, "chromium is not installed: .ci/run installs it (apt-get install chromium)"
  root = str(tmp_path)
  for bs in (32, 128, 512, 2048):
    write_trial(root, bs)
  running, _ = write_trial(root, 8192, summary=False, stop_frac=0.3)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"axes": {}, "trials": [{"index": i} for i in range(8)]}, f)
  out = report.write_report(root)
  with open(os.path.join(out, "index.html")) as f:
    page = f.read()
  probe, dom, shot = open_in_chromium(os.path.join(out, "index.html"), root)
  pngs = sorted(n for n in os.listdir(out) if n.endswith(".png"))
  assert probe["images"] == len(pngs) and probe["broken"] == []
  # The first screen opens with the findings; the steps-to-target figure is the first figure.
  assert 0 < probe["findings"] < probe["screen"] and probe["figure"] > probe["findings"]
  assert page.index("<h2>Findings</h2>") < page.index("<h2>Figures</h2>") < page.index(
      "<h2>Tables</h2>") < page.index("<summary>Sweep definition (sweep.json)")
  assert re.search(r"<figure id='steps_to_target.png'><img [^>]+><figcaption><b>Figure 1\.", page)
  assert "4 of 8 trials finished (4 done, 0 diverged); 1 running, 3 not started" in dom
  # The unfinished trial: its status, last update, and links to its directory and metrics.
  assert f"<a href='../trials/{running}/'>{running}</a>" in page
  assert f"<a href='../trials/{running}/metrics.jsonl'>metrics.jsonl</a>" in page
  assert re.search(r"<td>running</td><td>\d+ of \d+</td><td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC",
                   page)
  from matplotlib import image
  assert image.imread(shot).shape[:2] == (900, 1280)

  # The probe sees a broken image when there is one.
  os.remove(os.path.join(out, "training_curves.png"))
  probe, _, _ = open_in_chromium(os.path.join(out, "index.html"), root)
  assert probe["broken"] == ["training_curves.png"]
