"""Orchestration: the gate's comparison, the perf run, A/B, worktrees, bisect, explain, parity.
"""
