"""Baselines and the benchmark harness: every baseline is a configuration of the same model."""
