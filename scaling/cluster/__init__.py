"""Cluster: a sweep's unfinished trials as one Slurm array (launch, sbatch) and a read-only status
view of a workdir.

May import scaling.config, scaling.sweep, scaling.sharding, scaling.training and
scaling.analysis; launch imports JAX only after its cheap checks (tests/test_layers.py).
"""
