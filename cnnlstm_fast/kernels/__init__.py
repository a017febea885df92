"""Kernels behind the compiled backends (``triton/``: Triton kernels, plain Python).

Importing this package imports nothing heavy; each backend imports its kernels lazily
so that the package works without Triton.
"""
