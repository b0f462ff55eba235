"""Evaluation: the only library code that reads oracle labels (tests/test_oracle_isolation.py)."""
