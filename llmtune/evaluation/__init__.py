"""Evaluation: held-out exact match now; lm-evaluation-harness suites slot in beside it."""
