"""Paper reproductions: each module runs its sweeps through scaling.sweep (the trainer of
`python -m scaling.main`), writes the report, and prints one verdict line per claim."""
