"""`python -m scaling.status`: where a sweep or trial stands (read-only) (scaling/cluster/status.py)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("scaling.cluster.status", run_name="__main__", alter_sys=True)
