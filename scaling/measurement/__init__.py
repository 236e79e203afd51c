"""Measurement: the estimators (Hessian trace, eigenvalues, spectral density and sharpness; the
gradient noise scale during training and at frozen parameters), pure functions of a loss and
arrays, and `measure.Measure`, which applies the curvature ones to a trial's training loss.

May import scaling.config, scaling.sharding and scaling.models; never scaling.training (which
imports it), scaling.analysis or scaling.cluster (tests/test_layers.py).
"""
