"""Swap our layers into an existing model in place, and back.

``swap`` re-classes each torch.nn recurrent module to ours (``module.__class__ =
cnnlstm_fast.nn.LSTM`` etc.) and sets its ``backend``. Our classes add no state but
``backend`` and no ``__init__`` work, so the re-classed object is the complete module:
the same object, hence the same Parameter objects (optimizers built before the swap
keep updating them), buffers, hooks, training mode, device, dtype and state_dict keys,
and every place that refers to it (a module registered under several parents or names,
a closure, an optimizer) sees the swap without any tree rewriting. Building a new
module and copying ``__dict__`` across would have to find and replace each of those
references; re-classing cannot miss one.

A user's subclass of a torch.nn layer is swapped only with ``include_subclasses=True``,
into a class derived from both theirs and ours (``(UserLSTM, cnnlstm_fast.nn.LSTM)``):
their methods, ``forward`` overrides included, come first and reach our ``forward``
through ``super()``. ``unswap`` restores the original class.

A parametrized layer (``torch.nn.utils.parametrizations.weight_norm`` and the like) has
a class of its own that torch.nn.utils.parametrize made for that module, on top of the
layer's class, holding the parametrized tensors' properties. Both ways, that class is
rebuilt on top of the new layer class, so the parametrizations keep working and
``remove_parametrizations`` leaves the module with the swapped layer class.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

from torch import nn
from torch.nn.utils import parametrize

from .. import backends
from . import rnn

__all__ = ["swap", "unswap"]

logger = logging.getLogger(__name__)

#: torch.nn class -> our class.
OURS: dict[type, type] = {
    nn.LSTM: rnn.LSTM,
    nn.GRU: rnn.GRU,
    nn.RNN: rnn.RNN,
    nn.LSTMCell: rnn.LSTMCell,
    nn.GRUCell: rnn.GRUCell,
    nn.RNNCell: rnn.RNNCell,
}

# One combined class per user subclass, so repeated swaps give the same class.
_COMBINED: dict[type, type] = {}


def _combined_class(user_cls: type) -> type:
    """The class deriving from ``user_cls`` and ours, user methods first."""
    if user_cls not in _COMBINED:
        torch_cls = next(c for c in user_cls.__mro__ if c in OURS)
        combined = type(
            user_cls.__name__,
            (user_cls, OURS[torch_cls]),
            {
                "__module__": user_cls.__module__,
                "__qualname__": user_cls.__qualname__,
                "__reduce_ex__": _reduce_combined,
                "_cnnlstm_fast_user_class": user_cls,
            },
        )
        combined.__signature__ = inspect.signature(user_cls)
        _COMBINED[user_cls] = combined
    return _COMBINED[user_cls]


def _new_combined(user_cls: type) -> nn.Module:
    return object.__new__(_combined_class(user_cls))


def _reduce_combined(self, protocol):
    # pickle finds a class by module and name, which give the user's class, not the
    # combined one: rebuild the combined class from the user's on load instead.
    return _new_combined, (self._cnnlstm_fast_user_class,), self.__getstate__()


def _parametrized_base(cls: type) -> type | None:
    """The layer class under ``cls`` if ``cls`` is the class torch.nn.utils.parametrize
    made for one parametrized module (it subclasses the module's class), else None."""
    return cls.__bases__[0] if cls.__module__ == parametrize.__name__ else None


def _reparametrized(cls: type, base: type) -> type:
    """``cls`` (a parametrized module's own class) rebuilt on ``base``: the same
    properties and methods, in a class of the same name deriving from ``base``."""
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, (base,), namespace)


def _on_parametrized(cls: type, convert: Callable[[type], type | None]) -> type | None:
    """``convert`` of ``cls``, looking through a parametrized module's own class."""
    base = _parametrized_base(cls)
    if base is None:
        return convert(cls)
    target = convert(base)
    if target is None or target is base:
        return None if target is None else cls
    return _reparametrized(cls, target)


def _swapped_class(cls: type, include_subclasses: bool) -> type | None:
    if issubclass(cls, rnn._BackendMixin):
        return cls  # already ours: only the backend changes
    if cls in OURS:
        return OURS[cls]
    if include_subclasses and issubclass(cls, tuple(OURS)):
        return _combined_class(cls)
    return None


def _target_class(module: nn.Module, include_subclasses: bool) -> type | None:
    """The class ``module`` becomes on a swap, or None if it is not swapped."""
    return _on_parametrized(type(module), lambda cls: _swapped_class(cls, include_subclasses))


def _original_class(cls: type) -> type | None:
    """The class one of our modules gets back on unswap, or None (a user's subclass of
    ours stays as it is)."""
    if "_cnnlstm_fast_user_class" in cls.__dict__:
        return cls._cnnlstm_fast_user_class
    if cls in OURS.values():
        return rnn._torch_class_of_type(cls)
    return None


def _class_name(cls: type) -> str:
    """How the log names a module's class: torch.nn's and ours by name; any other (a
    user's or another library's subclass, which may well be called ``LSTM`` too) by its
    module and qualified name, so that it is not taken for torch.nn's."""
    layer = _parametrized_base(cls) or cls
    if layer in OURS or layer in OURS.values():
        return cls.__qualname__
    name = f"{layer.__module__}.{layer.__qualname__}"
    return name if layer is cls else f"{name}, parametrized"


def _origin(cls: type) -> str:
    """What a module that swap re-classes was: torch.nn's layer, ours already, or a
    subclass of a torch.nn layer (a user's or another library's)."""
    layer = _parametrized_base(cls) or cls
    if issubclass(layer, rnn._BackendMixin):
        return "already ours"
    if layer in OURS:
        return "torch.nn"
    torch_cls = next(c for c in layer.__mro__ if c in OURS)
    return f"a subclass of torch.nn.{torch_cls.__name__}"


def swap(
    model: nn.Module,
    backend: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    include_subclasses: bool = False,
) -> nn.Module:
    """Makes every torch.nn LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell in ``model`` ours, in place.

    Args:
        model: any module; ``model`` itself may be a recurrent layer.
        backend: the ``backend`` the swapped modules get ("auto" or a registered name).
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` chooses which candidates
            to swap (default: all). A module registered under several names is offered
            once, under its first name in ``model.named_modules()`` order ("" for ``model``).
        include_subclasses: also swap users' subclasses of the torch.nn layers (exact
            types only by default), into a class derived from theirs and ours.

    Modules that are already ours get ``backend`` set. The modules stay the same
    objects (see the module docstring), so parameters, buffers, hooks, training mode,
    device, dtype and state_dict keys are unchanged. What was swapped is logged at INFO
    on the ``cnnlstm_fast.nn.swap`` logger, one line per call.

    Returns:
        ``model``.
    """
    backends._check_name(backend)
    swapped, skipped = [], []
    for name, module in model.named_modules():
        target = _target_class(module, include_subclasses)
        if target is None:
            if isinstance(module, tuple(OURS)):
                skipped.append(f"{name or '<model>'} ({_class_name(type(module))}: a subclass; "
                               "pass include_subclasses=True)")
            continue
        if filter_fn is not None and not filter_fn(module, name):
            skipped.append(f"{name or '<model>'} (filter_fn)")
            continue
        swapped.append(f"{name or '<model>'} ({_class_name(type(module))}, {_origin(type(module))})")
        module.__class__ = target
        module.backend = backend
    logger.info(
        "swap(backend=%r): %d module(s) now cnnlstm_fast: %s%s",
        backend,
        len(swapped),
        ", ".join(swapped) or "none",
        f"; not swapped: {', '.join(skipped)}" if skipped else "",
    )
    return model


def unswap(model: nn.Module) -> nn.Module:
    """Gives every one of our recurrent modules in ``model`` its torch.nn class back, in place.

    The inverse of :func:`swap`: modules stay the same objects with the same parameters.
    Modules built as ours (``cnnlstm_fast.LSTM(...)``) become plain torch.nn layers too;
    users' subclasses swapped with ``include_subclasses=True`` get their own class back.

    Returns:
        ``model``.
    """
    restored = []
    for name, module in model.named_modules():
        if not isinstance(module, rnn._BackendMixin):
            continue
        original = _on_parametrized(type(module), _original_class)
        if original is None:
            continue  # a user's subclass of ours: theirs to keep
        module.__class__ = original
        del module.backend
        restored.append(f"{name or '<model>'} ({original.__qualname__})")
    logger.info("unswap: %d module(s) now torch.nn: %s", len(restored), ", ".join(restored) or "none")
    return model
