"""What every part of jaxdist shares.

The one error type, the checked structure of the files it reads back, atomic writes, disk
errors, one-line argument errors, metrics.jsonl's record format, and the run's typed
configuration (`jaxdist.base.config`).
"""
