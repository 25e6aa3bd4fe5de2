"""The training loop and what runs around it.

The start, the loop (`fit`), metrics and logs, stopping rules, preemption, reading a run
back.
"""
