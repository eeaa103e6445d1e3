"""Metrics: accumulating per-task metrics (`tasks`) and multi-objective measures (`pareto`)."""
