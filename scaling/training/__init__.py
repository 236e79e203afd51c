"""Training: a trial's compiled step and chunk, the one training loop over a group of trials, its
typed record, checkpoints, learning-rate schedule, costs and console progress.

`train.run(config, workdir)` is a trial; `train.run_group` trains M of them through one chunk.
May import scaling.config, scaling.sharding, scaling.models, scaling.data and scaling.measurement;
never scaling.analysis or scaling.cluster (tests/test_layers.py).
"""
