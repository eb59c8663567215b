"""Evaluation: metrics against the truth."""
