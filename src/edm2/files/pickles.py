"""A reader of the official pickles (EDM2 and EDM network snapshots, reference statistics) that runs no code.

The official code pickles every object of its own classes through `torch_utils.persistence`: the pickle calls
`_reconstruct_persistent_obj(meta)`, where `meta` holds the class name, the source text of the module that
defines it (`module_src`), and the object's `__dict__` (`state`: parameters, buffers, submodules and the
constructor's `_init_args` / `_init_kwargs`). Unpickling with `pickle.load` would compile and run that source.
Here only an allow-list of globals resolves, each to an inert stand-in: a persistent object becomes a `Record`
of its data (the source text is never compiled), torch containers become `Record`s too, tensors are rebuilt
from their bytes, numpy arrays through numpy's own array reconstruction. Any other global is refused with a
ValueError that names it.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Record", "read_pickle", "load_pickle_bytes", "ALLOW_NETWORK", "ALLOW_NUMPY"]

# Storage classes of torch's legacy serialization -> dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MODULE_STATE_KEYS = ("_parameters", "_buffers", "_modules")


@dataclass
class Record:
    """The data of one object as the official pickle recorded it; nothing of its class is run.

    `class_name` is the official class name (`Precond`, `StabilityVAEEncoder`, ...) for objects of the official
    code, or the full name (`torch.nn.modules.container.ModuleDict`) for torch's own modules. `persistent`
    tells the two apart; only persistent objects carry `init_args` / `init_kwargs`.
    """

    class_name: str
    persistent: bool
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    parameters: dict[str, torch.Tensor | None] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor | None] = field(default_factory=dict)
    modules: dict[str, Record | None] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)  # the rest of the object's __dict__
    version: int | None = None  # persistence format version (6 in EDM and EDM2)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers of this object and its submodules, named as torch's
        `Module.state_dict()` names them."""
        out: dict[str, torch.Tensor] = {}
        skip = set(self.attributes.get("_non_persistent_buffers_set") or ())
        for name, value in self.parameters.items():
            if value is not None:
                out[prefix + name] = value
        for name, value in self.buffers.items():
            if value is not None and name not in skip:
                out[prefix + name] = value
        for name, module in self.modules.items():
            if module is not None:
                out.update(module.state_dict(f"{prefix}{name}."))
        return out

    def walk(self, prefix: str = ""):
        """(dotted name, record) of this object and every submodule, depth first."""
        yield prefix, self
        for name, module in self.modules.items():
            if module is not None:
                yield from module.walk(f"{prefix}.{name}" if prefix else name)

    def _set_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"state of {self.class_name} is a {type(state).__name__}, not a dict")
        state = dict(state)
        for key in _MODULE_STATE_KEYS:
            value = state.pop(key, None) or {}
            if not isinstance(value, dict):
                raise pickle.UnpicklingError(f"{self.class_name}.{key} is a {type(value).__name__}, not a dict")
            setattr(self, key.lstrip("_"), dict(value))
        self.init_args = tuple(state.pop("_init_args", None) or ())
        self.init_kwargs = dict(state.pop("_init_kwargs", None) or {})
        self.attributes = state


def _reconstruct_persistent_obj(meta: Any) -> Record:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: keeps the data, ignores the source."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a persistent object whose record is not {'type': 'class', 'class_name': ...}")
    if not isinstance(meta.get("module_src", ""), str):
        raise pickle.UnpicklingError(f"persistent object {meta['class_name']}: module_src is not text")
    record = Record(meta["class_name"], persistent=True, version=meta.get("version"))
    record._set_state(meta.get("state") or {})  # module_src stays unread: it is never compiled or executed
    return record


class _TorchObject(Record):
    """Stand-in for an object of torch.nn (containers such as ModuleDict): created empty, filled by BUILD."""

    qualname = "torch.nn.Module"

    def __new__(cls, *args: Any) -> _TorchObject:
        obj = object.__new__(cls)
        Record.__init__(obj, cls.qualname, persistent=False)
        return obj

    def __setstate__(self, state: Any) -> None:
        self._set_state(state)


def _torch_object_class(module: str, name: str) -> type:
    """A stand-in class for `module.name` (a torch.nn module class); nothing of the real class is used."""
    return type(name, (_TorchObject,), {"qualname": f"{module}.{name}"})


# ----------------------------------------------------------------------------------------------------
# Tensors: torch pickles a tensor as _rebuild_tensor_v2(storage, offset, size, stride, ...) and its storage as
# _load_from_bytes(bytes of a legacy torch.save of that storage).


@dataclass
class _Storage:
    dtype: torch.dtype
    data: torch.Tensor  # 1-D, `dtype`


def _storage_dtype(module: str, name: str) -> torch.dtype:
    if module == "torch" and name in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[name]
    raise pickle.UnpicklingError(f"refused global {module}.{name} inside a tensor storage record")


class _StorageHeaderUnpickler(pickle.Unpickler):
    """The small pickles inside a legacy storage record: plain values and one persistent id naming the storage."""

    def find_class(self, module: str, name: str) -> Any:
        return ("storage-type", _storage_dtype(module, name))

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id in a tensor storage record: {pid!r:.80}")
        _, kind, key, _location, numel, view = pid
        if not (isinstance(kind, tuple) and kind[0] == "storage-type") or not isinstance(numel, int):
            raise pickle.UnpicklingError("malformed tensor storage record")
        if view is not None:
            raise pickle.UnpicklingError("storage views in a tensor storage record are not supported")
        return ("storage", kind[1], str(key), numel)


def _load_from_bytes(data: Any) -> _Storage:
    """Parse the bytes torch writes for one storage (legacy `torch.save` format): magic number, protocol,
    system info, the storage's persistent id, the list of storage keys, then per key an int64 element count
    and the raw little-endian elements."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("tensor storage record is not bytes")
    f = io.BytesIO(data)
    load = lambda: _StorageHeaderUnpickler(f).load()  # noqa: E731
    if load() != _LEGACY_MAGIC or load() != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("tensor storage record has an unknown format (not torch's legacy format)")
    sys_info = load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise pickle.UnpicklingError("big-endian tensor storage records are not supported")
    root = load()
    keys = load()
    if not (isinstance(root, tuple) and root[0] == "storage") or keys != [root[2]]:
        raise pickle.UnpicklingError("tensor storage record does not hold exactly one storage")
    dtype, numel = root[1], root[3]
    (count,) = struct.unpack("<q", f.read(8).ljust(8, b"\0"))
    nbytes = numel * torch.empty([], dtype=dtype).element_size()
    raw = f.read(nbytes)
    if count != numel or len(raw) != nbytes:
        raise pickle.UnpicklingError("tensor storage record is truncated")
    return _Storage(dtype, torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty([0], dtype=dtype))


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage record")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or min(size, default=1) < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError("malformed tensor record")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.data.numel():
        raise pickle.UnpicklingError("tensor record reaches past its storage (truncated or damaged)")
    return storage.data.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter record without a tensor")
    return data


# ----------------------------------------------------------------------------------------------------
# The allow-list.


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy array of a subclass other than ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    dtype = np.dtype(spec)
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy arrays of Python objects are not read")
    return dtype


_NUMPY = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY[(_mod, "_reconstruct")] = _np_reconstruct
    _NUMPY[(_mod, "scalar")] = _np_scalar
_NUMPY[("numpy", "ndarray")] = np.ndarray
_NUMPY[("numpy", "dtype")] = _np_dtype
_NUMPY[("collections", "OrderedDict")] = collections.OrderedDict

ALLOW_NUMPY = frozenset(_NUMPY)  # reference statistics: dicts of numpy arrays
_NETWORK = {
    **_NUMPY,
    ("dnnlib.util", "EasyDict"): dict,
    ("dnnlib", "EasyDict"): dict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): tuple,
}
ALLOW_NETWORK = frozenset(_NETWORK) | {("torch.nn.modules.*", "*")}  # network pickles: also torch.nn containers


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, allow: frozenset) -> None:
        super().__init__(file)
        self.allow = allow

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allow and (module, name) in _NETWORK:
            return _NETWORK[(module, name)]
        if ("torch.nn.modules.*", "*") in self.allow and module.startswith("torch.nn.modules.") \
                and name.isidentifier() and name[:1].isupper():
            return _torch_object_class(module, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of an official pickle")


class _Refused(pickle.UnpicklingError):
    pass


def load_pickle_bytes(data: bytes, allow: frozenset = ALLOW_NETWORK, source: str = "<bytes>") -> Any:
    """Unpickle `data` resolving only the globals in `allow`; ValueError naming any other global, or saying
    that the data is not a readable pickle."""
    return _load(io.BytesIO(data), allow, source)


def _load(f: Any, allow: frozenset, source: str) -> Any:
    head = f.peek(2)[:2] if hasattr(f, "peek") else f.getvalue()[:2]
    if head == b"PK":
        raise ValueError(f"{source}: a zip archive (torch.save or TorchScript file), not a pickle of the official "
                         "code")
    try:
        return _RestrictedUnpickler(f, allow).load()
    except _Refused as e:
        raise ValueError(f"{source}: refused: the pickle calls {e}, which is not on edm2's allow-list (edm2 runs no "
                         "code from pickles; only official network snapshots and statistics are read)") from None
    except (pickle.UnpicklingError, EOFError, struct.error) as e:
        raise ValueError(f"{source}: not a readable official pickle (truncated or damaged?): {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, MemoryError,
            RecursionError) as e:
        raise ValueError(f"{source}: not a readable official pickle ({type(e).__name__}: {e})") from None


def read_pickle(path: str | Path, allow: frozenset = ALLOW_NETWORK) -> Any:
    """Read an official pickle file without running code (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:  # streamed: a large network is not held twice in memory
        return _load(f, allow, str(path))
