"""Triton kernels of the recurrence (see ``recurrence.py`` and ``persistent.py``).

Importing this package needs Triton; ``cnnlstm_fast.backends.triton`` imports it only
when the backend runs.
"""
