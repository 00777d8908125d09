"""A pickle module for ``torch.load(..., pickle_module=safe_pickle)`` of foreign checkpoints.

fairseq checkpoints pickle objects of classes we do not install (``fairseq.dataclass.configs.*``,
``omegaconf.dictconfig.DictConfig``, enums, ...). Our :class:`Unpickler` resolves only an allowlist
of harmless globals (torch's tensor rebuilders, dtypes, numpy array reconstruction, plain builtin
containers, ``argparse.Namespace``); every other global becomes a :class:`Placeholder` subclass
that records its constructor arguments and pickled state instead of running any code. So loading
needs neither fairseq nor omegaconf and cannot execute arbitrary callables.
:func:`to_plain` turns the recorded objects (omegaconf containers included) into plain Python.
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import pickle
from typing import Any

import torch

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
}
_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "dict", "list",
             "tuple", "int", "float", "str", "bool", "object"}
_NUMPY = {"_reconstruct", "scalar", "ndarray", "dtype"}


def _allowed(module: str, name: str) -> Any | None:
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module in ("builtins", "__builtin__") and name in _BUILTINS:
        return __builtins__[name] if isinstance(__builtins__, dict) else getattr(__builtins__, name)
    if module == "_codecs" and name == "encode":
        import _codecs

        return _codecs.encode
    if module == "torch._utils" and name.startswith("_rebuild"):
        return getattr(torch._utils, name, None)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module.split(".")[0] == "numpy" and (name in _NUMPY or module == "numpy.dtypes"):
        import importlib

        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
    return None


class Placeholder:
    """Stands in for an unavailable class or function; records what the pickle gave it."""

    _pickled_module = ""
    _pickled_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, elements=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["elements"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["elements"].extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self._pickled_module}.{self._pickled_name}>"


_PLACEHOLDERS: dict[tuple[str, str], type[Placeholder]] = {}


def placeholder_class(module: str, name: str) -> type[Placeholder]:
    """The (cached) Placeholder subclass standing for ``module.name``."""
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(name.replace(".", "_") or "Anonymous", (Placeholder,),
                                  {"_pickled_module": module, "_pickled_name": name,
                                   "__module__": __name__})
    return _PLACEHOLDERS[key]


class Unpickler(pickle.Unpickler):
    """Resolves allowlisted globals; anything else becomes a Placeholder subclass."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed(module, name)
        return found if found is not None else placeholder_class(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return Unpickler(io.BytesIO(data), **kwargs).load()


Pickler = pickle.Pickler
dump = pickle.dump
dumps = pickle.dumps
HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
DEFAULT_PROTOCOL = pickle.DEFAULT_PROTOCOL
UnpicklingError = pickle.UnpicklingError


_OMEGACONF_INTERNAL = {"_parent", "_metadata", "_flags_cache"}


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """Plain dicts/lists/scalars from Namespaces, omegaconf containers and placeholders."""
    if _depth > 64:
        raise ValueError("to_plain: configuration nested deeper than 64 levels")
    d = _depth + 1
    if isinstance(obj, argparse.Namespace):
        return to_plain(vars(obj), d)
    if isinstance(obj, dict):
        return {str(k): to_plain(v, d) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v, d) for v in obj]
    if isinstance(obj, Placeholder):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if isinstance(state, dict):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                content = state["_content"]
                return None if content in (None, "???") else to_plain(content, d)
            if "_val" in state:  # omegaconf value node
                value = state["_val"]
                return None if value == "???" else to_plain(value, d)
            return to_plain({k: v for k, v in state.items() if k not in _OMEGACONF_INTERNAL}, d)
        if obj.items:
            return to_plain(obj.items, d)
        if obj.elements:
            return to_plain(obj.elements, d)
        if len(obj.args) == 1 and not obj.kwargs:  # enum member: Enum(value)
            return to_plain(obj.args[0], d)
        if obj.kwargs:
            return to_plain(obj.kwargs, d)
        return to_plain(list(obj.args), d) if obj.args else None
    return obj
