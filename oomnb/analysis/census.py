"""Which tensors a notebook keeps alive, and under which names.

:func:`take_census` walks the roots it is given (the user namespace, IPython's
output cache, the last traceback) and returns one :class:`TensorRecord` per
storage: views, slices and ``.detach()`` share a storage and count once.
Each record is named by its best path; the other paths that reach the same
storage are listed in ``also_held_by``.  Tensors kept alive by autograd graphs
(a stored ``loss`` keeps every activation its backward needs) are found through
the graph's ``_saved_*`` attributes and ``next_functions``.  Optimizers are
walked through their ``param_groups`` as well as their ``state``: once ``del
model`` has run, the optimizer is what keeps the parameters (and their
gradients) alive, and they are named after it.

Plain data in and out, no IPython; the census keeps no reference to anything
it saw once it returns.
"""

from __future__ import annotations

import collections
import gc
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..model.units import BLOCK_ROUND

__all__ = ["HOLDER_KINDS", "Census", "TensorRecord", "take_census"]

#: Holder kinds, best first: a storage is named after its best holder.
HOLDER_KINDS = (
    "variable",
    "parameter",
    "buffer",
    "gradient",
    # A parameter only an optimizer's param_groups still reach (after `del model`);
    # ranked below "parameter" so that a live module keeps naming its parameters.
    "optimizer_param",
    "optimizer_state",
    "attribute",
    "container",
    "output_cache",
    "traceback",
    "autograd_graph",
)
_RANK = {kind: rank for rank, kind in enumerate(HOLDER_KINDS)}

#: Values that hold no tensor: never walked.
ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), range, slice)
_ATOMS = ATOMS
# Exact types, for a set lookup in the hot loops (subclasses take the slow path).
_ATOM_TYPES = frozenset(_ATOMS)
#: Objects that hold no data of the user's: never walked (a module would walk a library).
OPAQUE_TYPES = (
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    type,
    types.CodeType,
    types.FrameType,
    types.TracebackType,
    types.GeneratorType,
)
_MAX_DEPTH = 8
_MAX_ITEMS = 1_000_000
_MAX_GRAPH_NODES = 500_000


@dataclass(slots=True)
class TensorRecord:
    """One storage the notebook keeps alive (bytes as the allocator counts them)."""

    path: str
    holder: str
    root: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    nbytes: int
    requires_grad: bool
    data_ptr: int = 0
    graph_bytes: int = 0
    also_held_by: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclass
class Census:
    """Everything the census found, biggest first."""

    records: list[TensorRecord]
    bytes_by_device: dict[str, int]
    allocated_bytes: int | None = None
    device: str | None = None
    truncated: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes of every storage found, on every device."""
        return sum(self.bytes_by_device.values())

    @property
    def device_bytes(self) -> int:
        """Bytes found on the measured device (all devices when none is set)."""
        if self.device is None:
            return self.total_bytes
        return self.bytes_by_device.get(self.device, 0)

    @property
    def unreachable_bytes(self) -> int | None:
        """Allocated bytes the notebook cannot reach (closures, C++ caches, other frames)."""
        if self.allocated_bytes is None:
            return None
        return max(0, self.allocated_bytes - self.device_bytes)

    def by_root(self) -> dict[str, list[TensorRecord]]:
        """Records grouped by their top-level name, groups biggest first."""
        groups: dict[str, list[TensorRecord]] = collections.defaultdict(list)
        for record in self.records:
            groups[record.root].append(record)
        return dict(sorted(groups.items(), key=lambda item: -sum(r.nbytes for r in item[1])))

    def root_bytes(self) -> dict[str, int]:
        return {root: sum(r.nbytes for r in records) for root, records in self.by_root().items()}

    def find(self, path: str) -> TensorRecord | None:
        for record in self.records:
            if record.path == path or path in record.also_held_by:
                return record
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": [r.to_dict() for r in self.records],
            "bytes_by_device": dict(self.bytes_by_device),
            "total_bytes": self.total_bytes,
            "device": self.device,
            "device_bytes": self.device_bytes,
            "allocated_bytes": self.allocated_bytes,
            "unreachable_bytes": self.unreachable_bytes,
            "truncated": list(self.truncated),
        }


class _Walker:
    def __init__(self) -> None:
        # storage key -> [best record, storage bytes]; keys are ids of storages
        # held in `self.alive` for the walk's duration only.
        self.records: dict[int, TensorRecord] = {}
        self.alive: list[Any] = []
        self.visited: set[int] = set()
        self.param_names: dict[int, str] = {}
        self.optimizers: list[tuple[str, str, Any]] = []
        self.graph_roots: list[tuple[TensorRecord, Any, str, str, int]] = []
        self.graph_sets: list[tuple[TensorRecord, set[int]]] = []
        self.truncated: list[str] = []
        self.items = 0
        self.saved_names: dict[type, list[str]] = {}
        self.device_names: dict[Any, str] = {}
        self.dtype_names: dict[Any, str] = {}

    # -- tensors ----------------------------------------------------------------
    def tensor(self, t: torch.Tensor, path: str, holder: str, root: str) -> int | None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None  # sparse or other layouts without one storage
        key = id(storage)
        record = self.records.get(key)
        if record is None:
            device = storage.device
            device_name = self.device_names.get(device)
            if device_name is None:
                device_name = self.device_names[device] = str(device)
            if device_name == "meta":
                return None
            dtype = t.dtype
            dtype_name = self.dtype_names.get(dtype)
            if dtype_name is None:
                dtype_name = self.dtype_names[dtype] = str(dtype).removeprefix("torch.")
            self.alive.append(storage)
            # round_allocation, inlined: this line runs once per storage.
            nbytes = -(-storage.nbytes() // BLOCK_ROUND) * BLOCK_ROUND
            # t.shape is a torch.Size: an immutable tuple, safe to keep.
            self.records[key] = record = TensorRecord(
                path, holder, root, t.shape, dtype_name, device_name, nbytes, t.requires_grad, storage.data_ptr()
            )
        else:
            rank, best = _RANK[holder], _RANK[record.holder]
            # Ties go to the shorter path, except that Out[n] keeps its name
            # over the _, __ and _N aliases.
            shorter = len(path) < len(record.path) and holder != "output_cache"
            if rank < best or (rank == best and shorter):
                record.also_held_by.append(record.path)
                record.path, record.holder, record.root = path, holder, root
                record.shape = tuple(t.shape)
                record.requires_grad = t.requires_grad
            elif path != record.path and path not in record.also_held_by:
                record.also_held_by.append(path)
        if not t.requires_grad or holder == "autograd_graph":
            return key
        if t.grad_fn is not None:
            self.graph_roots.append((record, t.grad_fn, path, root, key))
        elif holder not in ("gradient", "optimizer_param"):
            # (An optimizer's parameters name their gradients in optimizer_param.)
            grad = t.grad
            if grad is not None:
                self.tensor(grad, path + ".grad", "gradient", root)
        return key

    # -- objects ------------------------------------------------------------------
    def walk(self, obj: Any, path: str, holder: str, root: str, depth: int = 0) -> None:
        kind = type(obj)
        if kind in _ATOM_TYPES:
            return
        if kind is torch.Tensor or isinstance(obj, torch.Tensor):
            self.tensor(obj, path, holder, root)
            return
        if isinstance(obj, (_ATOMS, OPAQUE_TYPES)) or depth > _MAX_DEPTH:
            return
        oid = id(obj)
        if oid in self.visited:
            return
        self.visited.add(oid)
        inner = "container" if holder == "variable" else holder
        # Exact builtin containers first: ABC isinstance checks are slow.
        if kind is dict:
            self.mapping(obj, path, inner, root, depth)
        elif kind is list or kind is tuple:
            self.sequence(obj, path, inner, root, depth)
        elif isinstance(obj, torch.nn.Module):
            self.module(obj, path, holder, root)
        elif isinstance(obj, torch.optim.Optimizer):
            self.optimizers.append((path, root, obj))
        elif isinstance(obj, Mapping):
            self.mapping(obj, path, inner, root, depth)
        elif isinstance(obj, (list, tuple, collections.deque)):
            self.sequence(obj, path, inner, root, depth)
        elif isinstance(obj, (set, frozenset)):
            for item in obj:
                if isinstance(item, torch.Tensor) or not isinstance(item, _ATOMS):
                    self.walk(item, f"{path}{{…}}", inner, root, depth + 1)
        else:
            self.attributes(obj, path, holder, root, depth)

    def sequence(self, seq: Any, path: str, holder: str, root: str, depth: int) -> None:
        if len(seq) > _MAX_ITEMS:
            self.truncated.append(f"{path}: only the first {_MAX_ITEMS} items")
        tensor_type, atoms = torch.Tensor, _ATOM_TYPES
        for index, item in enumerate(seq):
            if index >= _MAX_ITEMS:
                break
            kind = type(item)
            if kind in atoms:
                continue
            if kind is tensor_type or isinstance(item, tensor_type):
                self.tensor(item, f"{path}[{index}]", holder, root)
            else:
                self.walk(item, f"{path}[{index}]", holder, root, depth + 1)

    def mapping(self, mapping: Mapping[Any, Any], path: str, holder: str, root: str, depth: int) -> None:
        tensor_type, atoms = torch.Tensor, _ATOM_TYPES
        try:
            items = list(mapping.items())
        except Exception:
            return
        for count, (key, value) in enumerate(items):
            if count >= _MAX_ITEMS:
                self.truncated.append(f"{path}: only the first {_MAX_ITEMS} items")
                break
            kind = type(value)
            if kind in atoms:
                pass
            elif kind is tensor_type or isinstance(value, tensor_type):
                self.tensor(value, f"{path}[{key!r}]", holder, root)
            else:
                self.walk(value, f"{path}[{key!r}]", holder, root, depth + 1)
            if type(key) not in atoms and isinstance(key, tensor_type):
                self.tensor(key, f"{path}<key>", holder, root)

    def attributes(self, obj: Any, path: str, holder: str, root: str, depth: int) -> None:
        try:
            attrs = vars(obj)
        except TypeError:
            attrs = {}
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(obj, slot):
                        attrs[slot] = getattr(obj, slot, None)
        if not attrs:
            return
        inner = "attribute" if holder in ("variable", "container", "attribute") else holder
        for name, value in list(attrs.items()):
            if isinstance(value, torch.Tensor) or not isinstance(value, _ATOMS):
                self.walk(value, f"{path}.{name}", inner, root, depth + 1)

    def module(self, module: torch.nn.Module, path: str, holder: str, root: str) -> None:
        kind = holder if holder in ("output_cache", "traceback") else None
        for name, param in module.named_parameters(remove_duplicate=False):
            full = f"{path}.{name}"
            self.param_names.setdefault(id(param), full)
            self.tensor(param, full, kind or "parameter", root)
        for name, buffer in module.named_buffers(remove_duplicate=False):
            self.tensor(buffer, f"{path}.{name}", kind or "buffer", root)
        # Tensors kept as plain attributes of modules (caches, masks).
        for prefix, sub in module.named_modules(remove_duplicate=True):
            self.visited.add(id(sub))
            for name, value in vars(sub).items():
                if name.startswith("_") or isinstance(value, torch.nn.Module):
                    continue
                if isinstance(value, torch.Tensor) or not isinstance(value, _ATOMS):
                    sub_path = f"{path}.{prefix}.{name}" if prefix else f"{path}.{name}"
                    self.walk(value, sub_path, kind or "attribute", root, 1)

    def optimizer(self, path: str, root: str, opt: torch.optim.Optimizer) -> None:
        index_of: dict[int, int] = {}
        for number, group in enumerate(opt.param_groups):
            params = group.get("params", []) if isinstance(group, Mapping) else []
            for index, param in enumerate(params):
                index_of.setdefault(id(param), len(index_of))
                if isinstance(param, torch.Tensor):
                    self.optimizer_param(param, f"{path}.param_groups[{number}]['params'][{index}]", root)
        for param, state in list(opt.state.items()):
            name = self.param_names.get(id(param))
            label = name if name is not None else f"param {index_of.get(id(param), '?')}"
            if not isinstance(state, Mapping):
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self.tensor(value, f"{path}.state[{label}][{key!r}]", "optimizer_state", root)

    def optimizer_param(self, param: torch.Tensor, path: str, root: str) -> None:
        """A parameter reached through ``param_groups``: named after the optimizer only
        when nothing better (a module, a variable) reaches it."""
        key = self.tensor(param, path, "optimizer_param", root)
        grad = param.grad
        if key is None or grad is None:
            return
        # The gradient follows its parameter's name: if a module names the
        # parameter it has named the gradient too, and a second, shorter
        # `opt...grad` path must not take the name from it.
        if self.records[key].path == path:
            self.tensor(grad, path + ".grad", "gradient", root)
        else:
            try:
                grad_record = self.records.get(id(grad.untyped_storage()))
            except (RuntimeError, NotImplementedError, TypeError):
                return  # sparse gradients have no single storage
            grad_path = path + ".grad"
            if grad_record is not None and grad_path != grad_record.path and grad_path not in grad_record.also_held_by:
                grad_record.also_held_by.append(grad_path)

    # -- autograd graphs ------------------------------------------------------------
    def _saved(self, node: Any) -> list[str]:
        cls = type(node)
        names = self.saved_names.get(cls)
        if names is None:
            names = [n for n in dir(node) if n.startswith("_saved_")]
            self.saved_names[cls] = names
        return names

    def graph(self, record: TensorRecord, grad_fn: Any, path: str, root: str, own: int, budget: list[int]) -> None:
        storages: set[int] = set()
        stack = [grad_fn]
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            budget[0] -= 1
            if budget[0] < 0:
                self.truncated.append(f"{path}: autograd graph walk stopped after {_MAX_GRAPH_NODES} nodes")
                break
            for name in self._saved(node):
                try:
                    value = getattr(node, name)
                except Exception:
                    continue  # freed by backward, or not a tensor
                values = value if isinstance(value, (tuple, list)) else (value,)
                for item in values:
                    if isinstance(item, torch.Tensor):
                        key = self.tensor(item, f"{path}.grad_fn→{type(node).__name__}.{name}", "autograd_graph", root)
                        if key is not None:
                            storages.add(key)
            try:
                stack.extend(fn for fn, _ in node.next_functions)
            except Exception:
                continue
        storages.discard(own)
        self.graph_sets.append((record, storages))

    def finish(self) -> None:
        for path, root, opt in self.optimizers:
            self.optimizer(path, root, opt)
        budget = [_MAX_GRAPH_NODES]
        done: set[int] = set()
        for record, grad_fn, path, root, own in self.graph_roots:
            if id(grad_fn) in done:
                continue
            done.add(id(grad_fn))
            self.graph(record, grad_fn, path, root, own, budget)
        for record, storages in self.graph_sets:
            record.graph_bytes += sum(
                self.records[key].nbytes for key in storages if self.records[key].holder == "autograd_graph"
            )


def take_census(
    namespace: Mapping[str, Any],
    *,
    output_cache: Mapping[Any, Any] | None = None,
    output_aliases: Mapping[str, Any] | None = None,
    tracebacks: Iterable[Any] = (),
    allocated_bytes: int | None = None,
    device: str | None = None,
) -> Census:
    """Find every tensor the given roots keep alive.

    Parameters
    ----------
    namespace
        Variables by name (the user namespace, without IPython's own names).
    output_cache
        IPython's ``Out`` dict: execution count -> value.
    output_aliases
        ``_``, ``__``, ``___`` and ``_N`` names -> value.
    tracebacks
        Tracebacks whose frames keep locals alive (``sys.last_traceback``).
    allocated_bytes, device
        The backend's allocated figure and device (``"cpu"`` for the
        simulated device, ``"cuda:0"``), for the unreachable summary.
    """
    # Thousands of new records would trigger full collections of every object
    # in the process (a fifth of a second with torch imported): pause the
    # collector for the walk; it allocates no cycles.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _take_census(namespace, output_cache, output_aliases, tracebacks, allocated_bytes, device)
    finally:
        if was_enabled:
            gc.enable()


def _take_census(
    namespace: Mapping[str, Any],
    output_cache: Mapping[Any, Any] | None,
    output_aliases: Mapping[str, Any] | None,
    tracebacks: Iterable[Any],
    allocated_bytes: int | None,
    device: str | None,
) -> Census:
    walker = _Walker()
    tensor_type = torch.Tensor
    for name, value in list(namespace.items()):
        if type(value) is tensor_type:
            walker.tensor(value, name, "variable", name)
        else:
            walker.walk(value, name, "variable", name)
    for number, value in list((output_cache or {}).items()):
        walker.walk(value, f"Out[{number}]", "output_cache", f"Out[{number}]")
    for name, value in list((output_aliases or {}).items()):
        walker.walk(value, name, "output_cache", name)
    for tb in tracebacks:
        _walk_traceback(walker, tb)
    walker.finish()
    records = sorted(walker.records.values(), key=lambda r: (-r.nbytes, r.path))
    by_device: dict[str, int] = collections.defaultdict(int)
    for record in records:
        by_device[record.device] += record.nbytes
    census = Census(
        records=records,
        bytes_by_device=dict(by_device),
        allocated_bytes=allocated_bytes,
        device=device,
        truncated=walker.truncated,
    )
    walker.alive.clear()
    return census


def _walk_traceback(walker: _Walker, tb: Any) -> None:
    while tb is not None:
        frame = tb.tb_frame
        # Module-level frames' locals are the namespace itself: already walked.
        if frame.f_locals is not frame.f_globals:
            where = f"<traceback> {frame.f_code.co_name}()"
            for name, value in list(frame.f_locals.items()):
                walker.walk(value, f"{where}.{name}", "traceback", "<traceback>")
        tb = tb.tb_next


def holds_tensors(value: Any, depth: int = 2) -> bool:
    """Whether ``value`` is a tensor, module or optimizer, or holds one within ``depth`` levels
    (containers and the attributes of ordinary objects, a trainer holding a model)."""
    if isinstance(value, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)):
        return True
    if depth <= 0 or isinstance(value, (_ATOMS, OPAQUE_TYPES)):
        return False
    items: Any
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        items = value
    elif isinstance(getattr(value, "__dict__", None), dict) and not callable(value):
        items = vars(value).values()
    else:
        return False
    return any(holds_tensors(item, depth - 1) for _, item in zip(range(1000), list(items), strict=False))


def last_tracebacks() -> list[Any]:
    """The tracebacks ``sys`` keeps of the last error (``sys.last_traceback``/``last_exc``)."""
    found = []
    tb = getattr(sys, "last_traceback", None)
    if tb is not None:
        found.append(tb)
    exc = getattr(sys, "last_exc", None)
    if exc is not None and exc.__traceback__ is not None and exc.__traceback__ is not tb:
        found.append(exc.__traceback__)
    return found
