"""A fingerprint of everything a notebook user owns, and the difference between two.

``capture(user_ns, folder)`` walks every name of the user namespace (IPython's
own names and ``_``-names excepted) and every file under ``folder``:

* ``paths``: one descriptor per reachable value, keyed by where it was found
  (``model.0.weight``, ``model.0.weight.grad``, ``opt.param_groups[0].lr``,
  ``opt.state[g0p1].exp_avg``, ``losses[3]``, ``data['x']``).  Tensors are
  described by dtype, shape, ``requires_grad``, ``grad_fn`` and the sha256 of
  their bytes; plain values by ``repr``; containers by type and length; a value
  already met is an alias of the path it was first met at.
* ``items``: the things whose identity matters, each with the path it was
  first met at: every tensor storage (the memory itself, so a view, a
  ``.detach()`` or a ``torch.from_numpy`` of a NumPy array still reaches it),
  every NumPy buffer, every module, optimizer, function and ordinary object.
  Only weak references are kept, so the fingerprint never keeps alive what
  the cell would free, and an ``id`` reused by a new object is never mistaken
  for the old one.
* ``files``: every file under ``folder`` (size and sha256).

``diff(before, after)`` must be called while the objects of ``after`` are
alive (right after capturing it): it says which items of ``before`` are no
longer reachable (``@path``: lost), whose content changed (``@path``), which
paths and files were lost, changed or added.  The result is plain data, so the
diffs of two runs of the same cells (a reference run and a run under the tool)
can be compared key by key.

A CPU tensor's bytes are read straight from its storage's memory (``ctypes``),
with no torch operation at all: the simulated device neither counts a copy
nor registers a tensor it has not yet seen, and cannot run out of memory on
the harness.  Other devices are copied to the host under ``oomnb.untracked()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import types
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import oomnb

__all__ = ["Diff", "Fingerprint", "capture", "diff", "files_of", "is_user_name"]

#: Names IPython binds by itself (and ``_``-names): not the user's.
_IPYTHON_NAMES = re.compile(r"^(In|Out|_|__|___|_i+|_i\d+|_\d+|_ih|_oh|_dh|exit|quit|get_ipython)$")

MAX_DEPTH = 6
MAX_ITEMS = 200  # elements of one container, attributes of one object
MAX_REPR = 200

_ATOMS = (int, float, complex, bool, str, bytes, type(None), type(Ellipsis), torch.dtype, torch.device)
_OPAQUE = (
    types.ModuleType,
    type,
    types.BuiltinFunctionType,
    types.MethodType,
    types.GeneratorType,
    types.CoroutineType,
    types.FrameType,
    types.TracebackType,
    types.CodeType,
)


def is_user_name(name: str) -> bool:
    return not name.startswith("_") and not _IPYTHON_NAMES.match(name)


@dataclass
class Diff:
    """What changed between two fingerprints, as plain data.

    Keys: a path (``model.0.weight``), an item (``@model.0.weight``: the
    storage, module or object first met at that path) or a file
    (``file:ckpt.pt``).
    """

    lost: dict[str, str] = field(default_factory=dict)
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.lost or self.changed or self.added)

    def all_keys(self) -> set[str]:
        return set(self.lost) | set(self.changed) | set(self.added)

    def describe(self, limit: int = 40) -> str:
        lines = [f"lost {k} (was {v})" for k, v in sorted(self.lost.items())]
        lines += [f"changed {k}: {a} -> {b}" for k, (a, b) in sorted(self.changed.items())]
        lines += [f"added {k}: {v}" for k, v in sorted(self.added.items())]
        if len(lines) > limit:
            lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
        return "\n".join(lines) or "(no difference)"


@dataclass
class _Item:
    path: str
    ident: tuple[str, int]
    content: str
    ref: Any  # weakref.ref, or None once captured as plain data


@dataclass
class Fingerprint:
    """What :func:`capture` found: see the module's docstring."""

    paths: dict[str, str]
    items: dict[str, _Item]  # first path -> item
    index: dict[tuple[str, int], str]  # identity -> content, for what is reachable now
    files: dict[str, str]
    names: list[str]

    def alive(self, key: str) -> bool:
        item = self.items[key]
        return item.ref is not None and item.ref() is not None


def _sha(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _short(text: str) -> str:
    return text if len(text) <= MAX_REPR else f"{text[:MAX_REPR]}...<{len(text)} chars sha:{_sha(text.encode())}>"


_NUMPY = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def _raw(storage: Any) -> bytes:
    """A CPU storage's bytes, read straight from memory: no torch op, so the device sees nothing."""
    nbytes = storage.nbytes()
    return ctypes.string_at(storage.data_ptr(), nbytes) if nbytes else b""


def _logical(t: torch.Tensor, raw: bytes) -> np.ndarray:
    """The tensor's elements (C order) from its storage's bytes, as raw items of its size."""
    size = t.element_size()
    base = np.frombuffer(raw, dtype=np.dtype((np.void, size)))
    offset = t.storage_offset()
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=tuple(t.shape), strides=tuple(s * size for s in t.stride()), writeable=False
    )
    return np.ascontiguousarray(view)


def _storage_sha(storage: Any) -> str:
    if storage.device.type == "cpu":
        return _sha(_raw(storage))
    with oomnb.untracked(), torch.no_grad():  # CUDA: one copy to the host
        u8 = torch.empty(0, dtype=torch.uint8, device=storage.device)
        u8.set_(storage, 0, (storage.nbytes(),), (1,))
        return _sha(u8.cpu().numpy().tobytes())


def _array_root(a: np.ndarray) -> Any:
    root: Any = a
    while isinstance(getattr(root, "base", None), np.ndarray):
        root = root.base
    return root


class _Walker:
    def __init__(self, record_refs: bool) -> None:
        self.record_refs = record_refs
        self.paths: dict[str, str] = {}
        self.items: dict[str, _Item] = {}
        self.index: dict[tuple[str, int], str] = {}
        self.seen: dict[int, str] = {}  # id(obj) -> first path (aliases, cycles)
        self.keep: list[Any] = []  # what was visited stays alive during the walk: ids stay unique

    # -- items --------------------------------------------------------------
    def _item(self, path: str, ident: tuple[str, int], content: str, target: Any) -> None:
        if ident in self.index:
            return
        self.index[ident] = content
        ref = None
        if self.record_refs:
            try:
                ref = weakref.ref(target)
            except TypeError:
                return  # cannot tell later whether it is still the same object
        self.items[path] = _Item(path, ident, content, ref)

    def _storage_item(self, path: str, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except Exception:
            return
        if id(storage) in self.seen:
            return
        self.seen[id(storage)] = path
        self.keep.append(storage)
        real = not _is_fake(t)
        try:
            real = real and storage.device.type != "meta"
            ptr = storage.data_ptr() if real else 0
        except Exception:
            ptr, real = 0, False
        ident = ("mem", ptr) if ptr and real else ("obj", id(storage))
        if real:
            try:
                content = f"memory {storage.nbytes()}B sha:{_storage_sha(storage)}"
            except Exception as exc:
                content = f"storage <unreadable: {type(exc).__name__}>"
        else:
            content = f"storage on {storage.device.type} ({type(t).__name__}) <not real memory>"
        self._item(path, ident, content, storage)

    # -- descriptors ---------------------------------------------------------
    def _tensor_desc(self, t: torch.Tensor, kind: str) -> str:
        head = f"{kind}:{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
        if t.requires_grad:
            head += " rg"
        if t.grad_fn is not None:
            head += f" fn={type(t.grad_fn).__name__}"
        if _is_fake(t) or t.device.type == "meta":
            return f"{head} <{type(t).__name__} on {t.device}: no data>"
        try:
            if t.numel() == 0:
                return f"{head} empty"
            if t.device.type != "cpu" or t.is_sparse:
                with oomnb.untracked(), torch.no_grad():
                    t = t.detach().cpu().contiguous()
            elements = _logical(t, _raw(t.untyped_storage()))
            body = f"sha:{_sha(elements.tobytes())}"
            if t.is_conj() or t.is_neg():
                body += f" conj={t.is_conj()} neg={t.is_neg()}"
            if t.numel() == 1 and t.dtype in _NUMPY:
                body += f" ={elements.view(_NUMPY[t.dtype]).reshape(-1)[0].item()!r}"
            return f"{head} {body}"
        except Exception as exc:
            return f"{head} <unreadable: {type(exc).__name__}: {_short(str(exc))}>"

    # -- the walk ---------------------------------------------------------------
    def visit(self, path: str, value: Any, depth: int) -> None:
        if isinstance(value, (*_ATOMS, torch.Size)):
            text = repr(value)
            self.paths[path] = f"value:{type(value).__name__}:{_short(text)}"
            return
        if isinstance(value, _OPAQUE) and not isinstance(value, types.FunctionType):
            self.paths[path] = f"opaque:{type(value).__name__}:{getattr(value, '__name__', '')}"
            return
        first = self.seen.get(id(value))
        if first is not None:
            self.paths[path] = f"alias:{first}"
            return
        if depth > MAX_DEPTH:  # not marked as seen: a shorter path may still walk it
            self.paths[path] = f"deep:{type(value).__name__}"
            return
        self.seen[id(value)] = path
        self.keep.append(value)
        if isinstance(value, torch.Tensor):
            self._visit_tensor(path, value, depth)
        elif isinstance(value, np.ndarray):
            self._visit_array(path, value)
        elif isinstance(value, torch.nn.Module):
            self._visit_module(path, value, depth)
        elif isinstance(value, torch.optim.Optimizer):
            self._visit_optimizer(path, value, depth)
        elif isinstance(value, (list, tuple)):
            self.paths[path] = f"{type(value).__name__}:len={len(value)}"
            for i, item in enumerate(value[:MAX_ITEMS]):
                self.visit(f"{path}[{i}]", item, depth + 1)
        elif isinstance(value, dict):
            self.paths[path] = f"{type(value).__name__}:len={len(value)}"
            for i, (key, item) in enumerate(value.items()):
                if i >= MAX_ITEMS:
                    break
                self.visit(f"{path}[{_key(key)}]", item, depth + 1)
        elif isinstance(value, (set, frozenset)):
            self.paths[path] = f"{type(value).__name__}:len={len(value)}"
            for i, item in enumerate(sorted(value, key=_safe_repr)[:MAX_ITEMS]):
                self.visit(f"{path}{{{i}}}", item, depth + 1)
        elif isinstance(value, types.FunctionType):
            code = value.__code__
            self.paths[path] = f"function:{value.__qualname__} code:{_sha(code.co_code)}"
            self._item(path, ("obj", id(value)), self.paths[path], value)
        else:
            self._visit_object(path, value, depth)

    def _visit_tensor(self, path: str, t: torch.Tensor, depth: int) -> None:
        kind = "param" if isinstance(t, torch.nn.Parameter) else "tensor"
        self.paths[path] = self._tensor_desc(t, kind)
        self._storage_item(path, t)
        grad = t.grad if t.is_leaf else None
        if kind == "param" or grad is not None:
            if grad is None:
                self.paths[f"{path}.grad"] = "value:NoneType:None"
            else:
                self.visit(f"{path}.grad", grad, depth + 1)

    def _visit_array(self, path: str, a: np.ndarray) -> None:
        try:
            sha = _sha(np.ascontiguousarray(a).tobytes()) if a.dtype != object else _sha(repr(a).encode())
        except Exception as exc:
            sha = f"<unreadable {type(exc).__name__}>"
        self.paths[path] = f"ndarray:{a.dtype} {a.shape} sha:{sha}"
        root = _array_root(a)
        ptr = int(root.__array_interface__["data"][0]) if root.size else 0
        ident = ("mem", ptr) if ptr else ("obj", id(root))
        readable = root.dtype != object
        content = f"memory {root.nbytes}B sha:{_sha(np.ascontiguousarray(root).tobytes()) if readable else '?'}"
        self._item(path, ident, content, root)

    def _visit_module(self, path: str, m: torch.nn.Module, depth: int) -> None:
        hooks = sum(len(getattr(m, n, {}) or {}) for n in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
        self.paths[path] = f"module:{type(m).__name__} training={m.training} hooks={hooks}"
        self._item(path, ("obj", id(m)), f"module:{type(m).__name__}", m)
        for name, p in m._parameters.items():
            self.visit(f"{path}.{name}", p, depth + 1)
        for name, b in m._buffers.items():
            self.visit(f"{path}.{name}", b, depth + 1)
        for name, child in m._modules.items():
            self.visit(f"{path}.{name}", child, depth + 1)
        attrs = [(k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"]
        for name, item in attrs[:MAX_ITEMS]:
            self.visit(f"{path}.{name}", item, depth + 1)

    def _visit_optimizer(self, path: str, opt: torch.optim.Optimizer, depth: int) -> None:
        own = sorted(k for k in vars(opt) if not k.startswith("_"))
        self.paths[path] = f"optimizer:{type(opt).__name__} attrs={','.join(own)}"
        self._item(path, ("obj", id(opt)), f"optimizer:{type(opt).__name__}", opt)
        names: dict[int, str] = {}
        for g, group in enumerate(opt.param_groups):
            gpath = f"{path}.param_groups[{g}]"
            self.paths[gpath] = f"group:len={len(group['params'])}"
            for key, item in group.items():
                if key == "params":
                    for j, p in enumerate(item):
                        names[id(p)] = f"g{g}p{j}"
                        self.visit(f"{gpath}.params[{j}]", p, depth + 2)
                else:
                    self.visit(f"{gpath}.{key}", item, depth + 2)
        state = opt.state
        self.paths[f"{path}.state"] = f"state:len={len(state)}"
        entries = sorted(
            ((names.get(id(p), f"unknown:{type(p).__name__}"), p, s) for p, s in state.items()),
            key=lambda e: e[0],
        )
        for name, _p, entry in entries:
            spath = f"{path}.state[{name}]"
            if not isinstance(entry, dict):
                self.visit(spath, entry, depth + 2)
                continue
            self.paths[spath] = f"entry:{','.join(sorted(map(str, entry)))}"
            for key in sorted(entry, key=str):
                self.visit(f"{spath}.{key}", entry[key], depth + 3)

    def _visit_object(self, path: str, value: Any, depth: int) -> None:
        attrs = getattr(value, "__dict__", None)
        slots = [s for cls in type(value).__mro__ for s in getattr(cls, "__slots__", ()) if isinstance(s, str)]
        self.paths[path] = f"object:{type(value).__module__}.{type(value).__qualname__}"
        self._item(path, ("obj", id(value)), self.paths[path], value)
        pairs: list[tuple[str, Any]] = []
        if isinstance(attrs, dict):
            pairs += [(k, v) for k, v in attrs.items() if isinstance(k, str)]
        for s in slots:
            if s not in ("__dict__", "__weakref__"):
                try:
                    pairs.append((s, getattr(value, s)))
                except Exception:
                    continue  # an empty slot
        if not pairs and not callable(value):
            self.paths[path] += f" repr:{_short(_safe_repr(value))}"
        for name, item in pairs[:MAX_ITEMS]:
            self.visit(f"{path}.{name}", item, depth + 1)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<repr raised {type(exc).__name__}>"


def _key(key: Any) -> str:
    if isinstance(key, str):
        return repr(key)
    if isinstance(key, _ATOMS):
        return repr(key)
    return f"<{type(key).__name__}>"


def files_of(folder: Path | None) -> dict[str, str]:
    if folder is None:
        return {}
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found[path.relative_to(folder).as_posix()] = f"{len(data)}B sha:{_sha(data)}"
    return found


def user_names(user_ns: Mapping[str, Any]) -> list[str]:
    return sorted(n for n in user_ns if is_user_name(n))


def capture(user_ns: Mapping[str, Any], folder: Path | None = None) -> Fingerprint:
    """Fingerprint the user's namespace and the files under ``folder``."""
    walker = _Walker(record_refs=True)
    names = user_names(user_ns)
    for name in names:
        walker.visit(name, user_ns[name], 1)
    walker.keep.clear()
    return Fingerprint(walker.paths, walker.items, walker.index, files_of(folder), names)


def diff(before: Fingerprint, after: Fingerprint) -> Diff:
    """What changed from ``before`` to ``after`` (call right after capturing ``after``)."""
    result = Diff()
    for key, item in before.items.items():
        alive = item.ref is not None and item.ref() is not None
        now = after.index.get(item.ident) if alive else None
        if now is None:
            result.lost[f"@{key}"] = item.content
        elif now != item.content:
            result.changed[f"@{key}"] = (item.content, now)
    for table, prefix in ((before.paths, ""), (before.files, "file:")):
        other = after.paths if prefix == "" else after.files
        for key, desc in table.items():
            if key not in other:
                result.lost[prefix + key] = desc
            elif other[key] != desc:
                result.changed[prefix + key] = (desc, other[key])
        for key, desc in other.items():
            if key not in table:
                result.added[prefix + key] = desc
    return result


def walk_paths(user_ns: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """The ``paths`` of a capture without files or items (for debugging a corpus cell)."""
    walker = _Walker(record_refs=False)
    for name in user_names(user_ns):
        walker.visit(name, user_ns[name], 1)
    yield from walker.paths.items()
