"""Loads the compiled extension ``cnnlstm_fast._C`` once, if it was built.

The package imports without it; backends that need it report :func:`load_error`.

The C++ reads no environment variable. The one user switch it needs,
``CNNLSTM_FAST_CPU_CACHE_MB`` (the cpu backend's cache of freed buffers), is read here
when the extension loads and handed to it (``cpu_set_cache_limit``); a bad value leaves
the default bound, warns, and makes the ``cpu`` backend unavailable with the error as its
reason (:func:`settings_error`), so a backend named ``cpu`` raises it.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch  # noqa: F401  (the extension links against libtorch: load torch first)

_NOT_BUILT = (
    "cnnlstm_fast._C is not built: run `pip install -e . --no-build-isolation` "
    "(or `make setup`) in the source tree"
)


CPU_CACHE_ENV = "CNNLSTM_FAST_CPU_CACHE_MB"
CPU_CACHE_DEFAULT_MB = 1024

_settings_error: str | None = None


def cpu_cache_mb_from_environment() -> int:
    """``CNNLSTM_FAST_CPU_CACHE_MB`` as a number of MiB (unset or empty: 1024); a
    ValueError naming the variable and its value where it is not a whole number >= 0."""
    value = os.environ.get(CPU_CACHE_ENV, "")
    if value.strip() == "":
        return CPU_CACHE_DEFAULT_MB
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{CPU_CACHE_ENV} must be a whole number of MB >= 0, got {value!r}")
    return int(text)


def _apply_environment(module: ModuleType) -> None:
    global _settings_error
    try:
        mb = cpu_cache_mb_from_environment()
    except ValueError as error:
        _settings_error = str(error)
        warnings.warn(f"{error}: the cpu backend is unavailable until it is fixed",
                      RuntimeWarning, stacklevel=4)
        return
    module.cpu_set_cache_limit(mb << 20)


def settings_error() -> str | None:
    """Why the environment's settings for the extension were refused when it loaded (a
    bad ``CNNLSTM_FAST_CPU_CACHE_MB``), else None."""
    _load()
    return _settings_error


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}._C":
            return None, _NOT_BUILT
        return None, f"importing cnnlstm_fast._C failed: {error}"
    except ImportError as error:
        return None, f"importing cnnlstm_fast._C failed: {error}"
    if hasattr(module, "cpu_set_cache_limit"):
        _apply_environment(module)
    return module, None


def load() -> ModuleType | None:
    """The extension module, or None when it is missing or does not load."""
    return _load()[0]


def load_error() -> str | None:
    """None when the extension loaded, else why it did not."""
    return _load()[1]
