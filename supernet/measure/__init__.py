"""Measuring a supernet as users do: benchmark tasks (lm-evaluation-harness) and long-context retrieval."""
