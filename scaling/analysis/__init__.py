"""Analysis: trial directories -> tables, the study's estimates with their intervals, findings,
plots and the HTML report.

Never imports JAX, nor any part of scaling but scaling.config and itself: a report is written on
any laptop, beside a running sweep (tests/test_layers.py, tests/test_report.py).
"""
