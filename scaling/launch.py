"""`python -m scaling.launch`: the sbatch array of a sweep's unfinished trials (scaling/cluster/launch.py)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("scaling.cluster.launch", run_name="__main__", alter_sys=True)
