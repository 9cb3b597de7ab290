"""Runs: the run config, the runner (cells: train, cache logits, sweep, confirm), typed results,
per-cell plots and sweep tables, and MLflow tracking."""
