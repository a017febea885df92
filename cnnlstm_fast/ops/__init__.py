"""The recurrence op (one layer, one direction) that every module calls."""

from .recurrence import recurrence

__all__ = ["recurrence"]
