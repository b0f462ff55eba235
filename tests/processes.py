"""Stopping the servers and daemons the tests start in their own process groups (bench/_support.py: the
benchmarks start servers too)."""

from bench._support import stop_process_group

__all__ = ["stop_process_group"]
