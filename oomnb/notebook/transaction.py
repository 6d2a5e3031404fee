"""The cell as a transaction: what the user had before a cell, and how a failed cell is undone.

Before a measured cell runs, a :class:`Ledger` records, cheaply and without
keeping anything alive (weak references, ids, version counters), what the
user had: the object each name was bound to, the storages of tensors held at
the top of the namespace and in its containers, every parameter's gradient
(absent, or which tensor at which version) and every optimizer's state
entries.

After an out-of-memory error, :meth:`Ledger.roll_back` decides by
*provenance*, not by ``id()``:

- a name the cell bound to something new is removed only if its value is not
  the only way left to reach something that existed before the cell (a
  wrapper around the old model, a view of the old tensor, a numpy array's
  memory, a dict built from the old one are kept); where the name's earlier
  object is still alive, the name is bound to it again;
- gradients that were ``None`` before the cell are ``None`` again; a gradient
  the cell replaced is dropped; one the cell added to in place is kept and
  counted;
- optimizer state entries the cell created are removed; entries it changed in
  place are kept and counted;
- what stays changed is said in one line each (``notes``), never hidden.

No IPython here: a namespace is a dict.
"""

from __future__ import annotations

import contextlib
import re
import types
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis.census import ATOMS, OPAQUE_TYPES, holds_tensors

__all__ = ["IPYTHON_NAMES", "Ledger", "Rollback"]

#: Names IPython binds by itself: never recorded, never rolled back.
IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython)$")

_ATOMS = ATOMS
_OPAQUE = OPAQUE_TYPES
# Per name, at most this many container items are recorded before a cell:
# the ledger's cost stays bounded however big a list the notebook keeps.
_ITEMS_PER_NAME = 256
_WALK_DEPTH = 6
_WALK_BUDGET = 500_000


def _weak(value: Any) -> weakref.ref[Any] | None:
    try:
        return weakref.ref(value)
    except TypeError:
        return None


def _storage(tensor: torch.Tensor) -> Any:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


@dataclass
class _Binding:
    ident: int
    ref: weakref.ref[Any] | None
    kind: type
    length: int | None

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is the object this name was bound to before the cell."""
        if self.ref is not None:
            return self.ref() is value
        # Not weakly referenceable (a list, a dict): id and type, which a
        # new object of the same type could reuse. Such a false "same" keeps
        # the name (a leak at worst), never deletes data.
        return id(value) == self.ident and type(value) is self.kind


@dataclass
class _Param:
    ref: weakref.ref[Any]
    version: int
    grad: weakref.ref[Any] | None
    grad_version: int


@dataclass
class _Optimizer:
    ref: weakref.ref[Any]
    #: id(param) -> {state key: (weak ref to tensor, version) or repr of a plain value}
    entries: dict[int, dict[Any, Any]]


@dataclass
class Rollback:
    """What :meth:`Ledger.roll_back` did."""

    released: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    #: Rebound names whose earlier value is gone: their new value is kept.
    replaced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _plain_object(value: Any) -> bool:
    """An instance of a user or library class with its own attributes (not a module, tensor or container)."""
    return (
        hasattr(value, "__dict__")
        and not isinstance(value, (type, types.ModuleType, types.FunctionType, types.MethodType))
        and not isinstance(value, (torch.nn.Module, torch.optim.Optimizer, torch.Tensor))
    )


class _Old:
    """What existed before the cell and is still alive: ids checked through weak refs."""

    def __init__(self) -> None:
        self.objects: dict[int, weakref.ref[Any]] = {}
        self.storages: dict[int, weakref.ref[Any]] = {}
        self.arrays: list[tuple[weakref.ref[Any], int, int]] = []
        #: Tensors a module or optimizer keeps alive across the cell: their
        #: storages are looked up only if a rollback needs them.
        self.lazy: list[weakref.ref[Any]] = []

    def add_lazy(self, tensor: torch.Tensor) -> None:
        self.lazy.append(weakref.ref(tensor))

    def resolve(self) -> None:
        """Record the storages of the lazily kept tensors that are still alive."""
        for ref in self.lazy:
            tensor = ref()
            if tensor is not None:
                self.add_storage(tensor)
        self.lazy.clear()

    def add(self, value: Any) -> None:
        ref = _weak(value)
        if ref is not None:
            self.objects[id(value)] = ref
        if isinstance(value, torch.Tensor):
            self.add_storage(value)
        elif type(value).__module__ == "numpy" and type(value).__name__ == "ndarray" and ref is not None:
            try:
                start = int(value.__array_interface__["data"][0])
                self.arrays.append((ref, start, start + int(value.nbytes)))
            except Exception:
                return

    def add_storage(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is not None:
            ref = _weak(storage)
            if ref is not None:
                self.storages[id(storage)] = ref

    def object_key(self, value: Any) -> int | None:
        ref = self.objects.get(id(value))
        return id(value) if ref is not None and ref() is value else None

    def storage_key(self, tensor: torch.Tensor) -> int | None:
        storage = _storage(tensor)
        if storage is None:
            return None
        ref = self.storages.get(id(storage))
        if ref is not None and ref() is storage:
            return id(storage)
        if self.arrays and storage.device.type == "cpu":
            pointer = storage.data_ptr()
            for array_ref, start, end in self.arrays:
                array = array_ref()
                if array is not None and start <= pointer < end:
                    return id(array)
        return None


class Ledger:
    """What the user had before a cell (see the module's docstring).

    Parameters
    ----------
    user_ns
        The namespace the cell runs in.
    scope
        The names the cell can reach (what it names, and what the functions it
        calls name): only they can be rebound or have their gradients and
        optimizer state changed by the cell, so only they are recorded in
        full.  Every other name is recorded by id only, and a change to one
        of them (through ``globals()``, say) is never rolled back.  ``None``:
        every name in full.
    """

    def __init__(self, user_ns: dict[str, Any], scope: set[str] | None = None) -> None:
        self.bindings: dict[str, _Binding] = {}
        #: id of every other name's value: enough to tell that it changed.
        self.others: dict[str, int] = {}
        self.old = _Old()
        self.params: dict[int, _Param] = {}
        self.optimizers: list[_Optimizer] = []
        #: Modules bound to names the cell can reach, to report tensors the
        #: failed cell stored on their attributes.
        self.models: list[tuple[str, weakref.ref[Any]]] = []
        #: Each module's plain tensor attributes before the cell (weak: never
        #: kept alive by the ledger), to put back what a failed forward replaced.
        self.attributes: dict[int, tuple[weakref.ref[Any], dict[str, weakref.ref[Any]]]] = {}
        #: Plain objects bound to names in scope (a Trainer), for the same.
        self.holders: list[tuple[str, weakref.ref[Any]]] = []
        modules: list[torch.nn.Module] = []
        optimizers: list[torch.optim.Optimizer] = []
        for name, value in list(user_ns.items()):
            if IPYTHON_NAMES.match(name) or name.startswith("__"):
                continue
            if scope is not None and name not in scope:
                self.others[name] = id(value)
                continue
            length = None
            if isinstance(value, (list, dict, set, tuple)):
                length = len(value)
            self.bindings[name] = _Binding(id(value), _weak(value), type(value), length)
            for item in self._first_items(value):
                self.old.add(item)
                if item is value and _plain_object(value):
                    # A Trainer, a config object: tensors it gains in place (trainer._tr_loss).
                    self._record_attributes(value)
                    with contextlib.suppress(TypeError):
                        self.holders.append((name, weakref.ref(value)))
                if isinstance(item, torch.nn.Module):
                    modules.append(item)
                    if item is value:
                        self.models.append((name, weakref.ref(item)))
                elif isinstance(item, torch.optim.Optimizer):
                    optimizers.append(item)
        seen: set[int] = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            for param in module.parameters():
                self._record_param(param)
            for buffer in module.buffers():
                self.old.add_lazy(buffer)
            for sub in module.modules():
                # Plain tensor attributes (a cached mask, what forward kept):
                # to tell them from what a failed cell stores there.
                self._record_attributes(sub)
        for opt in optimizers:
            if id(opt) in seen:
                continue
            seen.add(id(opt))
            self._record_optimizer(opt)

    def _record_attributes(self, owner: Any) -> None:
        before: dict[str, weakref.ref[Any]] = {}
        for attr, value in vars(owner).items():
            if isinstance(value, torch.Tensor):
                self.old.add(value)
                before[attr] = weakref.ref(value)
        with contextlib.suppress(TypeError):
            self.attributes.setdefault(id(owner), (weakref.ref(owner), before))

    @staticmethod
    def _first_items(value: Any) -> Iterator[Any]:
        """``value`` and, for containers and plain objects, what they hold (two levels, bounded)."""
        yield value
        count = 0
        stack: list[tuple[Any, int]] = [(value, 0)]
        while stack and count < _ITEMS_PER_NAME:
            current, depth = stack.pop()
            if depth >= 2 or isinstance(
                current, (_ATOMS, _OPAQUE, torch.Tensor, torch.nn.Module, torch.optim.Optimizer)
            ):
                continue
            items: Iterable[Any]
            if isinstance(current, dict):
                items = list(current.values())[:_ITEMS_PER_NAME]
            elif isinstance(current, (list, tuple, set, frozenset)):
                items = list(current)[:_ITEMS_PER_NAME]
            elif isinstance(getattr(current, "__dict__", None), dict) and not callable(current):
                items = list(vars(current).values())[:_ITEMS_PER_NAME]
            else:
                continue
            for item in items:
                if isinstance(item, (_ATOMS, _OPAQUE)):
                    continue
                count += 1
                yield item
                stack.append((item, depth + 1))
                if count >= _ITEMS_PER_NAME:
                    break

    def _record_param(self, param: torch.Tensor) -> None:
        if id(param) in self.params:
            return
        grad = param.grad
        self.params[id(param)] = _Param(
            weakref.ref(param),
            param._version,
            weakref.ref(grad) if grad is not None else None,
            grad._version if grad is not None else 0,
        )
        self.old.objects[id(param)] = self.params[id(param)].ref
        self.old.add_lazy(param)
        if grad is not None:
            self.old.add_lazy(grad)

    def _record_optimizer(self, opt: torch.optim.Optimizer) -> None:
        entries: dict[int, dict[Any, Any]] = {}
        for group in opt.param_groups:
            for param in group.get("params", []):
                if isinstance(param, torch.Tensor):
                    self._record_param(param)
        for param, state in list(opt.state.items()):
            recorded: dict[Any, Any] = {}
            if isinstance(state, dict):
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        ref = weakref.ref(value)
                        recorded[key] = (ref, value._version)
                        self.old.lazy.append(ref)
                    else:
                        recorded[key] = repr(value)[:200]
            entries[id(param)] = recorded
        self.optimizers.append(_Optimizer(weakref.ref(opt), entries))

    # -- after a failure ----------------------------------------------------------------
    def roll_back(
        self, user_ns: dict[str, Any], *, extra_roots: Iterable[Any] = (), temporaries: Iterable[str] = ()
    ) -> Rollback:
        """Undo what a failed cell created; keep and report what it changed in place.

        ``temporaries`` are names the cell rebinds on every pass of a loop
        (``for x, y in loader``): their values are never the only copy of the
        user's data, whatever they held before.
        """
        outcome = Rollback()
        self.old.resolve()
        self._undo_gradients(outcome)
        self._undo_optimizer_state(outcome)
        self._undo_names(user_ns, list(extra_roots), outcome, set(temporaries))
        self._report_containers(user_ns, outcome)
        self._report_module_attributes(outcome)
        return outcome

    def _undo_names(
        self, user_ns: dict[str, Any], extra_roots: list[Any], outcome: Rollback, temporaries: set[str]
    ) -> None:
        candidates: dict[str, Any] = {}
        for name, value in list(user_ns.items()):
            if IPYTHON_NAMES.match(name) or name.startswith("__"):
                continue
            if name in self.others:
                continue  # outside what the cell can reach: never rolled back
            binding = self.bindings.get(name)
            if binding is not None and binding.holds(value):
                continue
            if holds_tensors(value):
                candidates[name] = value
        # Names the cell deleted whose earlier object is still alive elsewhere.
        for name, binding in self.bindings.items():
            if name not in user_ns and binding.ref is not None and binding.ref() is not None:
                user_ns[name] = binding.ref()
                outcome.restored.append(name)
        if not candidates:
            return
        # What stays reachable without the candidates: everything else the
        # user has, and IPython's output cache.
        others = [v for n, v in user_ns.items() if n not in candidates and not IPYTHON_NAMES.match(n) and n[:2] != "__"]
        # A path to old data through a candidate, or through the namespace
        # itself (IPython's objects reach it), does not count: the walk never
        # enters them.
        fenced = {id(user_ns), *(id(v) for v in candidates.values())}
        reachable = _old_reached([*others, *extra_roots], self.old, fenced)
        # A candidate kept because it is the only way to old data makes that
        # data reachable: the candidates after it need not keep it too.
        for name, value in candidates.items():
            reached = _old_reached([value], self.old, {id(user_ns)})
            if reached - reachable:
                outcome.kept.append(name)
                reachable |= reached
                continue
            binding = self.bindings.get(name)
            earlier = binding.ref() if binding is not None and binding.ref is not None else None
            if binding is not None and earlier is None and name not in temporaries and not _holds_graph(value):
                # The cell replaced the name's value and the earlier one is gone
                # (X = X[perm], x = x.float(), model = copy.deepcopy(model)):
                # this is the only copy of the user's data now.  Only values
                # that hold an autograd graph (a loss, an output) are released.
                outcome.replaced.append(name)
                continue
            del user_ns[name]
            outcome.released.append(name)
            if earlier is not None:
                user_ns[name] = earlier
                outcome.restored.append(name)
        if outcome.replaced:
            one = len(outcome.replaced) == 1
            outcome.notes.append(
                f"kept {_listed(outcome.replaced)}: the failed cell replaced what {'it' if one else 'they'} held "
                f"before, which no longer exists, so {'this is' if one else 'these are'} the only copy of that data"
            )
        if outcome.kept:
            one = len(outcome.kept) == 1
            outcome.notes.append(
                f"kept {_listed(outcome.kept)}: the failed cell bound {'it' if one else 'them'} to objects that "
                "hold what you had before the cell (a wrapper, a view)"
            )

    def _undo_gradients(self, outcome: Rollback) -> None:
        dropped = changed = weights = 0
        for entry in self.params.values():
            param = entry.ref()
            if param is None:
                continue
            if param._version != entry.version:
                weights += 1
            grad = param.grad
            if grad is None:
                continue
            before = entry.grad() if entry.grad is not None else None
            if before is not None and grad is before:
                if grad._version != entry.grad_version:
                    changed += 1
                continue
            # A gradient the cell created (there was none, or the cell set it
            # to None and backward made a new one): part of no complete step.
            param.grad = None
            dropped += 1
        total = len(self.params)
        if dropped:
            outcome.released.append(f"gradients of {dropped} parameter{'s' if dropped != 1 else ''}")
        if changed:
            outcome.notes.append(
                f"the failed cell added to the existing gradients of {changed} of {total} parameters "
                "(kept): call `opt.zero_grad()` before rerunning"
            )
        if weights:
            outcome.notes.append(
                f"the failed cell changed the weights of {weights} of {total} parameters in place (kept)"
            )

    def _undo_optimizer_state(self, outcome: Rollback) -> None:
        removed = changed = kept = 0
        for entry in self.optimizers:
            opt = entry.ref()
            if opt is None:
                continue
            created = [p for p in opt.state if id(p) not in entry.entries]
            if created and _steps_complete(opt):
                # Every trainable parameter has state at the same step: the
                # cell's steps finished before the OOM, and the weights they
                # updated are kept, so their state stays with them.
                kept += len(created)
                created = []
            for param in created:
                del opt.state[param]
                removed += 1
            for param in list(opt.state.keys()):
                recorded = entry.entries.get(id(param))
                if recorded is None:
                    continue
                state = opt.state[param]
                if not isinstance(state, dict):
                    continue
                for key, value in list(state.items()):
                    before = recorded.get(key)
                    if isinstance(value, torch.Tensor):
                        if isinstance(before, tuple):
                            if before[0]() is not value or before[1] != value._version:
                                changed += 1
                                break
                        else:
                            changed += 1
                            break
                    elif before != repr(value)[:200]:
                        changed += 1
                        break
        if removed:
            outcome.released.append(f"optimizer state of {removed} parameter{'s' if removed != 1 else ''}")
        if kept:
            outcome.notes.append(
                f"kept the optimizer state the cell's completed steps created for {kept} parameter"
                f"{'s' if kept != 1 else ''} (the weights those steps updated are kept too)"
            )
        if changed:
            outcome.notes.append(
                f"the failed cell changed the optimizer state of {changed} parameter{'s' if changed != 1 else ''}"
                " in place (kept)"
            )

    def _report_module_attributes(self, outcome: Rollback) -> None:
        """Tensors a failed forward stored on module attributes (``self.last = h``).

        An attribute whose value before the cell is still alive gets it back;
        one the cell added is removed; one whose earlier value is gone keeps
        the new tensor (the only value left), and the report says so.
        """
        for name, ref in self.models + self.holders:
            owner = ref()
            if owner is None:
                continue
            count = nbytes = 0
            subs = owner.modules() if isinstance(owner, torch.nn.Module) else [owner]
            for sub in subs:
                recorded = self.attributes.get(id(sub))
                before = recorded[1] if recorded is not None and recorded[0]() is sub else None
                for attr, value in list(vars(sub).items()):
                    if not isinstance(value, torch.Tensor) or (
                        attr.startswith("_") and isinstance(sub, torch.nn.Module)
                    ):
                        continue
                    if self.old.object_key(value) is not None or self.old.storage_key(value) is not None:
                        continue
                    earlier = before[attr]() if before is not None and attr in before else None
                    if earlier is not None:
                        setattr(sub, attr, earlier)
                        continue
                    if before is not None and attr not in before:
                        delattr(sub, attr)
                        continue
                    count += 1
                    storage = _storage(value)
                    nbytes += storage.nbytes() if storage is not None else 0
            if count:
                outcome.notes.append(
                    f"`{name}` keeps {count} tensor{'s' if count != 1 else ''} the failed cell stored on its "
                    f"attributes ({nbytes / 2**20:.2f} MiB, kept): set them to None to free them"
                )

    def _report_containers(self, user_ns: dict[str, Any], outcome: Rollback) -> None:
        for name, binding in self.bindings.items():
            if binding.length is None or name not in user_ns:
                continue
            value = user_ns[name]
            if not binding.holds(value) or not hasattr(value, "__len__"):
                continue
            grown = len(value) - binding.length
            if grown > 0 and holds_tensors(value):
                outcome.notes.append(
                    f"`{name}` existed before the cell and the failed cell added {grown} item"
                    f"{'s' if grown != 1 else ''} to it (kept)"
                )


def _listed(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _holds_graph(value: Any, depth: int = 2) -> bool:
    """Whether ``value`` is, or holds within ``depth`` levels, a tensor with an autograd graph."""
    if isinstance(value, torch.Tensor):
        return value.grad_fn is not None
    if depth <= 0 or isinstance(value, (*_ATOMS, *_OPAQUE, torch.nn.Module)):
        return False
    items: Iterable[Any]
    if isinstance(value, dict):
        items = list(value.values())[:_ITEMS_PER_NAME]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)[:_ITEMS_PER_NAME]
    elif isinstance(getattr(value, "__dict__", None), dict):
        items = list(vars(value).values())[:_ITEMS_PER_NAME]
    else:
        return False
    return any(_holds_graph(item, depth - 1) for item in items)


def _steps_complete(opt: torch.optim.Optimizer) -> bool:
    """Whether every trainable parameter has optimizer state, all at the same step."""
    steps: set[float] = set()
    for group in opt.param_groups:
        for param in group.get("params", []):
            if not isinstance(param, torch.Tensor) or not param.requires_grad:
                continue
            state = opt.state.get(param)
            if not state:
                return False
            step = state.get("step") if isinstance(state, dict) else None
            if step is not None:
                try:
                    steps.add(float(step))
                except (TypeError, ValueError, RuntimeError):
                    return False
    return len(steps) <= 1


def _old_reached(roots: list[Any], old: _Old, fenced: set[int]) -> set[int]:
    """Keys of the old objects and storages reachable from ``roots``, never entering ``fenced`` ids."""
    found: set[int] = set()
    visited: set[int] = set(fenced)
    stack: list[tuple[Any, int]] = [(root, 0) for root in roots]
    budget = _WALK_BUDGET
    while stack and budget > 0:
        value, depth = stack.pop()
        budget -= 1
        if isinstance(value, (_ATOMS, _OPAQUE)):
            continue
        key = id(value)
        if key in visited:
            continue
        visited.add(key)
        hit = old.object_key(value)
        if hit is not None:
            found.add(hit)
        if isinstance(value, torch.Tensor):
            storage_hit = old.storage_key(value)
            if storage_hit is not None:
                found.add(storage_hit)
            base = value._base
            if base is not None:
                stack.append((base, depth + 1))
            continue
        if depth >= _WALK_DEPTH:
            continue
        children: Iterable[Any]
        if isinstance(value, torch.nn.Module):
            children = [
                *value._parameters.values(),
                *value._buffers.values(),
                *value._modules.values(),
                *(v for k, v in vars(value).items() if not k.startswith("_")),
            ]
        elif isinstance(value, torch.optim.Optimizer):
            children = [p for g in value.param_groups for p in g.get("params", [])]
        elif isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = list(value)
        elif isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, type):
            children = list(vars(value).values())
        else:
            continue
        stack.extend((child, depth + 1) for child in children if child is not None)
    return found
