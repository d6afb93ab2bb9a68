"""Benchmark suite for the sd package (pytest-benchmark): cases, timing harness, study table.

The suite runs with ``python -m pytest perf_tests``; ``python -m perf_tests`` is the command-line tool
around saved results (compare, update-baselines, report, ab).
"""
