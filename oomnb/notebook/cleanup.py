"""Census of a live IPython shell, and the actions that free what it holds.

This is the IPython-facing side of :mod:`oomnb.analysis.census`: it knows where IPython
keeps things (the user namespace, ``Out``, ``_``/``__``/``___``/``_N``,
``sys.last_traceback``), and every action measures the bytes it really freed
(allocated before and after, with garbage collected) and, when a storage
survives, says who still holds it.

Actions act on exactly what they are given: root names (a variable, ``Out[n]``,
an output alias, ``<traceback>``) for ``del``, and, for gradients, the census
path of one gradient.  :class:`Held` remembers what a root held when a view
was drawn, so that a view drawn before the user rebound a name never acts on
what the name holds now.
"""

from __future__ import annotations

import ast
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..analysis.census import Census, last_tracebacks, take_census
from ..backends import Backend
from ..model.units import format_bytes
from . import recovery

__all__ = ["MISSING", "ActionResult", "Cleaner", "Held", "RootKind", "resolve_path", "root_kind", "shell_census"]

_HIDDEN = re.compile(r"^(_i+|_i\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython|__.*__)$")
_OUTPUT_ALIAS = re.compile(r"^(_{1,3}|_\d+)$")
_OUT_ENTRY = re.compile(r"Out\[(\d+)\]")

#: What a root name is: a namespace variable, an ``Out[n]`` entry, an output
#: alias (``_``, ``_3``, ``_ (hidden)``) or the last error's traceback.
RootKind = Literal["variable", "output", "alias", "traceback"]


class _Missing:
    """What :meth:`Cleaner.root_value` gives for a name that holds nothing now."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def root_kind(name: str) -> RootKind:
    """Which kind of root the census name ``name`` is."""
    if _OUT_ENTRY.fullmatch(name):
        return "output"
    if name == "<traceback>":
        return "traceback"
    if _OUTPUT_ALIAS.match(name.removesuffix(" (hidden)")):
        return "alias"
    return "variable"


@dataclass(frozen=True)
class Held:
    """What a root name held when a view was drawn, without keeping it alive.

    A weak reference where the object allows one (tensors, modules,
    optimizers); otherwise its id and type (lists, dicts, tracebacks), which
    cannot tell an object from a same-typed one reusing a freed address, but
    never keeps memory alive.
    """

    ref: Callable[[], Any] | None
    ident: int
    kind: type

    @classmethod
    def of(cls, value: Any) -> Held:
        try:
            ref: Callable[[], Any] | None = weakref.ref(value)
        except TypeError:
            ref = None
        return cls(ref, id(value), type(value))

    def is_(self, value: Any) -> bool:
        """Whether ``value`` is the very object that was held."""
        if value is MISSING:
            return False
        if self.ref is not None:
            return self.ref() is value
        return id(value) == self.ident and type(value) is self.kind


def _steps(rest: str) -> list[tuple[str, Any]] | None:
    """``.name`` and ``[literal]`` steps of a census path after its root, or None."""
    steps: list[tuple[str, Any]] = []
    i = 0
    while i < len(rest):
        if rest[i] == ".":
            j = i + 1
            while j < len(rest) and rest[j] not in ".[":
                j += 1
            if j == i + 1:
                return None
            steps.append(("attr", rest[i + 1 : j]))
            i = j
        elif rest[i] == "[":
            # A key's repr may contain "]": take the first "]" that closes a literal.
            j = rest.find("]", i + 1)
            while j != -1:
                try:
                    key = ast.literal_eval(rest[i + 1 : j])
                    break
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    j = rest.find("]", j + 1)
            if j == -1:
                return None
            steps.append(("item", key))
            i = j + 1
        else:
            return None  # "{…}", "<key>", "grad_fn→…": not a place one can reach back
    return steps


def _grad_storage(owner: torch.Tensor) -> int:
    """Where ``owner.grad``'s storage lives (0 for none), without a reference left
    behind in the caller's frame to keep the gradient alive while it is freed."""
    grad = owner.grad
    if grad is None:
        return 0
    try:
        return int(grad.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return 0  # a sparse gradient has no single storage: freed all the same, just not watched


def resolve_path(value: Any, rest: str) -> Any:
    """The object the census path ``<root>rest`` names inside ``value`` (the root's
    object), or :data:`MISSING`.  Steps are those the census writes: module
    children and parameters, instance attributes, and container items."""
    steps = _steps(rest)
    if steps is None:
        return MISSING
    current = value
    for kind, key in steps:
        try:
            if kind == "item":
                current = current[key]
            elif isinstance(current, (torch.nn.Module, torch.Tensor, torch.optim.Optimizer)):
                current = getattr(current, key)
            else:
                # The census read vars(obj): read the same place, not a class property.
                current = vars(current)[key]
        except Exception:
            return MISSING
    return current


def _device_name(backend: Backend) -> str:
    return "cpu" if backend.kind == "simulated" else f"cuda:{backend.index}"


def shell_roots(shell: Any) -> tuple[dict[str, Any], dict[Any, Any], dict[str, Any]]:
    """(variables, Out, output aliases) of ``shell``, IPython's own names left out."""
    user_ns: dict[str, Any] = shell.user_ns
    hidden = getattr(shell, "user_ns_hidden", {})
    variables: dict[str, Any] = {}
    aliases: dict[str, Any] = {}
    for name, value in list(user_ns.items()):
        if _OUTPUT_ALIAS.match(name):
            if value is not None and not (isinstance(value, str) and value == ""):
                aliases[name] = value
        elif _HIDDEN.match(name) or (name in hidden and hidden[name] is value):
            continue
        else:
            variables[name] = value
    # IPython 9 also pushes _, __ and ___ into the hidden namespace, where
    # displayhook.flush() leaves them.
    for name in ("_", "__", "___"):
        value = hidden.get(name)
        if value is not None and value is not aliases.get(name) and not (isinstance(value, str) and value == ""):
            aliases[f"{name} (hidden)"] = value
    out = user_ns.get("Out")
    return variables, dict(out) if isinstance(out, dict) else {}, aliases


def shell_census(shell: Any, backend: Backend) -> Census:
    """Everything ``shell`` keeps alive, compared with ``backend``'s allocated bytes."""
    variables, out, aliases = shell_roots(shell)
    return take_census(
        variables,
        output_cache=out,
        output_aliases=aliases,
        tracebacks=last_tracebacks(),
        allocated_bytes=backend.snapshot().allocated_bytes,
        device=_device_name(backend),
    )


@dataclass
class ActionResult:
    """What an action did and the bytes it really gave back."""

    action: str
    targets: list[str]
    freed_bytes: int
    #: Paths that still hold storages the action meant to free.
    still_held_by: list[str] = field(default_factory=list)
    message: str = ""

    def summary(self) -> str:
        what = f"{self.action} {', '.join(self.targets)}" if self.targets else self.action
        text = f"{what}: freed {format_bytes(self.freed_bytes)}"
        if self.still_held_by:
            shown = ", ".join(self.still_held_by[:5]) + (" ..." if len(self.still_held_by) > 5 else "")
            text += f"; still held by {shown}"
        if self.message:
            text += f" ({self.message})"
        return text


class Cleaner:
    """The panel's actions, usable without widgets (``oomnb.panel().cleaner``)."""

    def __init__(self, shell: Any, backend: Backend) -> None:
        self.shell = shell
        self.backend = backend

    # -- measuring ------------------------------------------------------------------
    def census(self) -> Census:
        return shell_census(self.shell, self.backend)

    def _allocated_after_gc(self) -> int:
        recovery.collect()
        self.backend.empty_cache()
        return self.backend.snapshot().allocated_bytes

    def _measured(
        self, action: str, targets: list[str], change: Callable[[], str | None], watch: Iterable[int] = ()
    ) -> ActionResult:
        before = self._allocated_after_gc()
        message = change() or ""
        after = self._allocated_after_gc()
        result = ActionResult(action, targets, max(0, before - after), message=message)
        watched = set(watch)
        if watched:
            result.still_held_by = sorted(r.path for r in self.census().records if r.data_ptr in watched and r.nbytes)
        return result

    def _storages_of(self, roots: Iterable[str]) -> set[int]:
        wanted = set(roots)
        return {r.data_ptr for r in self.census().records if r.root in wanted and r.data_ptr}

    # -- what the roots hold ---------------------------------------------------------
    def root_value(self, name: str) -> Any:
        """What the census root ``name`` holds now, or :data:`MISSING`."""
        ns = self.shell.user_ns
        kind = root_kind(name)
        if kind == "output":
            out = ns.get("Out")
            match = _OUT_ENTRY.fullmatch(name)
            if not isinstance(out, dict) or match is None:
                return MISSING
            return out.get(int(match.group(1)), MISSING)
        if kind == "traceback":
            found = last_tracebacks()
            return found[0] if found else MISSING
        if kind == "alias" and name.endswith(" (hidden)"):
            return getattr(self.shell, "user_ns_hidden", {}).get(name.removesuffix(" (hidden)"), MISSING)
        return ns.get(name, MISSING)

    def snapshot(self, roots: Iterable[str]) -> dict[str, Held]:
        """What each of ``roots`` holds now, to check with :meth:`changed` before acting."""
        held = {}
        for name in roots:
            value = self.root_value(name)
            if value is not MISSING:
                held[name] = Held.of(value)
        return held

    def changed(self, snapshot: Mapping[str, Held], roots: Iterable[str]) -> list[str]:
        """Those of ``roots`` that no longer hold what ``snapshot`` saw (or were not in it)."""
        return [
            name
            for name in dict.fromkeys(roots)
            if name not in snapshot or not snapshot[name].is_(self.root_value(name))
        ]

    def gradient_owner(self, path: str, root: str) -> torch.Tensor | None:
        """The tensor whose ``.grad`` the census path ``path`` (under ``root``) names."""
        if not path.startswith(root) or not path.endswith(".grad"):
            return None
        value = self.root_value(root)
        if value is MISSING or root_kind(root) != "variable":
            return None
        owner = resolve_path(value, path[len(root) : -len(".grad")])
        if isinstance(owner, torch.Tensor) and owner.grad is not None:
            return owner
        return None

    # -- actions ------------------------------------------------------------------------
    def delete(self, names: list[str]) -> ActionResult:
        """``del`` the chosen variables (or ``Out[n]`` entries) from the namespace."""
        ns = self.shell.user_ns
        names = [n for n in names if n]
        watch = self._storages_of(names)

        def change() -> str | None:
            missing = []
            for name in names:
                match = _OUT_ENTRY.fullmatch(name)
                if match:
                    self._forget_output(int(match.group(1)))
                elif name == "<traceback>":
                    recovery.clear_last_traceback()
                elif _OUTPUT_ALIAS.match(name.removesuffix(" (hidden)")):
                    alias = name.removesuffix(" (hidden)")
                    for space in (ns, getattr(self.shell, "user_ns_hidden", {})):
                        if alias in space:
                            space[alias] = ""
                elif name in ns:
                    del ns[name]
                else:
                    missing.append(name)
            return f"not found: {', '.join(missing)}" if missing else None

        return self._measured("del", names, change, watch)

    def _forget_output(self, number: int) -> None:
        ns = self.shell.user_ns
        hidden = getattr(self.shell, "user_ns_hidden", {})
        out = ns.get("Out", {})
        value = out.pop(number, None)
        ns.pop(f"_{number}", None)
        hidden.pop(f"_{number}", None)
        for alias in ("_", "__", "___"):
            for space in (ns, hidden):
                if value is not None and space.get(alias) is value:
                    space[alias] = ""
        hook = getattr(self.shell, "displayhook", None)
        for alias in ("_", "__", "___"):
            if value is not None and getattr(hook, alias, None) is value:
                setattr(hook, alias, "")

    def clear_output_cache(self) -> ActionResult:
        """Empty ``Out`` and ``_``/``__``/``___``/``_N`` (IPython's ``%reset out``)."""
        watch = self._storages_of(self._output_roots())

        def change() -> None:
            self.shell.displayhook.flush()
            hidden = getattr(self.shell, "user_ns_hidden", {})
            for alias in ("_", "__", "___"):
                if alias in hidden:
                    hidden[alias] = ""

        return self._measured("clear output cache", [], change, watch)

    def _output_roots(self) -> list[str]:
        _, out, aliases = shell_roots(self.shell)
        return [f"Out[{n}]" for n in out] + list(aliases)

    def clear_traceback(self) -> ActionResult:
        """Drop the last error's traceback (``sys.last_traceback`` and friends)."""

        def change() -> str | None:
            held = recovery.clear_last_traceback()
            return None if held else "there was no traceback"

        return self._measured("clear traceback", [], change)

    def free_gradients(self, names: list[str], gradients: Mapping[str, str] | None = None) -> ActionResult:
        """``zero_grad(set_to_none=True)`` on the chosen modules and optimizers, and
        ``p.grad = None`` for single gradients: ``gradients`` maps a gradient's
        census path (``model.fc.weight.grad``) to its root (``model``)."""
        ns = self.shell.user_ns
        chosen = [n for n in names if isinstance(ns.get(n), (torch.nn.Module, torch.optim.Optimizer))]
        owners: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        for path, root in (gradients or {}).items():
            owner = self.gradient_owner(path, root)
            if owner is None:
                unknown.append(path)
            else:
                owners[path] = owner
        watch = {ptr for owner in owners.values() if (ptr := _grad_storage(owner))}

        def change() -> str | None:
            if unknown:
                # Act on all of the selection or on none of it.
                return f"no gradient at {', '.join(unknown)}; nothing was done"
            if not chosen and not owners:
                return "choose a module or an optimizer"
            for name in chosen:
                ns[name].zero_grad(set_to_none=True)
            for owner in owners.values():
                owner.grad = None
            return None

        targets = chosen + list(owners) + unknown
        return self._measured("free gradients of", targets, change, watch)

    def detach(self, names: list[str]) -> ActionResult:
        """``x = x.detach()`` for tensors holding autograd graphs (also inside lists and dicts)."""
        ns = self.shell.user_ns

        def change() -> str | None:
            count = 0
            for name in names:
                value = ns.get(name)
                if isinstance(value, torch.Tensor):
                    if value.grad_fn is not None:
                        ns[name] = value.detach()
                        count += 1
                elif isinstance(value, list):
                    for i, item in enumerate(value):
                        if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                            value[i] = item.detach()
                            count += 1
                elif isinstance(value, dict):
                    for key, item in list(value.items()):
                        if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                            value[key] = item.detach()
                            count += 1
            return f"{count} tensor(s) detached" if count else "nothing held a graph"

        return self._measured("detach", names, change)

    def move_to_host(self, names: list[str]) -> ActionResult:
        """Move the chosen tensors or modules to host memory (``.cpu()``).

        On the simulated device the host is the CPU itself, so the move is
        simulated: the data is copied into memory the device does not count.
        """
        ns = self.shell.user_ns
        simulated = self.backend.kind == "simulated"

        def to_host(t: torch.Tensor) -> torch.Tensor:
            if not simulated:
                return t.cpu()
            from ..backends.simulated import device

            with device.untracked():
                return t.detach().clone().requires_grad_(t.requires_grad) if t.is_leaf else t.detach().clone()

        def change() -> str | None:
            moved = []
            for name in names:
                value = ns.get(name)
                if isinstance(value, torch.Tensor):
                    ns[name] = to_host(value)
                    moved.append(name)
                elif isinstance(value, torch.nn.Module):
                    if simulated:
                        with torch.no_grad():
                            for param in value.parameters():
                                param.data = to_host(param.data)
                                if param.grad is not None:
                                    param.grad = to_host(param.grad)
                            for buffer in value.buffers():
                                buffer.data = to_host(buffer.data)
                    else:
                        value.cpu()
                    moved.append(name)
            return None if moved else "choose a tensor or a module"

        return self._measured("move to host", names, change, self._storages_of(names))

    def collect(self) -> ActionResult:
        """``gc.collect()`` and ``empty_cache()``."""
        return self._measured("gc.collect + empty_cache", [], lambda: None)


def in_ipython() -> Any:
    """The running IPython shell, or None."""
    module = sys.modules.get("IPython")
    if module is None:
        return None
    return module.get_ipython()
