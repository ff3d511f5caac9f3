"""The bit-width study: `python -m experiments.study.sweep` and its report."""
