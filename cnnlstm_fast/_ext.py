"""Loads the compiled extension ``cnnlstm_fast._C`` once, if it was built.

The package imports without it; backends that need it report :func:`load_error`.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch  # noqa: F401  (the extension links against libtorch: load torch first)

_NOT_BUILT = (
    "cnnlstm_fast._C is not built: run `pip install -e . --no-build-isolation` "
    "(or `make setup`) in the source tree"
)


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
    return module, None


def load() -> ModuleType | None:
    """The extension module, or None when it is missing or does not load."""
    return _load()[0]


def load_error() -> str | None:
    """None when the extension loaded, else why it did not."""
    return _load()[1]
