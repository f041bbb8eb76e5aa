"""Exposure bias, per-token risk kappa and Bridge/Garden labels (see `pipeline.run_analysis`)."""
