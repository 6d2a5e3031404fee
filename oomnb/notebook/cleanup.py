"""Census of a live IPython shell, and the actions that free what it holds.

This is the IPython-facing side of :mod:`oomnb.analysis.census`: it knows where IPython
keeps things (the user namespace, ``Out``, ``_``/``__``/``___``/``_N``,
``sys.last_traceback``), and every action measures the bytes it really freed
(allocated before and after, with garbage collected) and, when a storage
survives, says who still holds it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis.census import Census, last_tracebacks, take_census
from ..backends import Backend
from ..model.units import format_bytes
from . import recovery

__all__ = ["ActionResult", "Cleaner", "shell_census"]

_HIDDEN = re.compile(r"^(_i+|_i\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython|__.*__)$")
_OUTPUT_ALIAS = re.compile(r"^(_{1,3}|_\d+)$")


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

    # -- actions ------------------------------------------------------------------------
    def delete(self, names: list[str]) -> ActionResult:
        """``del`` the chosen variables (or ``Out[n]`` entries) from the namespace."""
        ns = self.shell.user_ns
        names = [n for n in names if n]
        watch = self._storages_of(names)

        def change() -> str | None:
            missing = []
            for name in names:
                match = re.fullmatch(r"Out\[(\d+)\]", name)
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

    def free_gradients(self, names: list[str]) -> ActionResult:
        """``zero_grad(set_to_none=True)`` on the chosen modules and optimizers."""
        ns = self.shell.user_ns
        chosen = [n for n in names if isinstance(ns.get(n), (torch.nn.Module, torch.optim.Optimizer))]

        def change() -> str | None:
            if not chosen:
                return "choose a module or an optimizer"
            for name in chosen:
                ns[name].zero_grad(set_to_none=True)
            return None

        return self._measured("free gradients of", chosen, change)

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
