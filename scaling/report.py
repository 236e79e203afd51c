"""`python -m scaling.report`: the HTML report of a sweep or trial (scaling/analysis/report.py)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("scaling.analysis.report", run_name="__main__", alter_sys=True)
