"""oomnb: CUDA out-of-memory errors, solved in notebooks.

Load it in IPython or Jupyter with ``%load_ext oomnb``, then put ``%%gpumem``
at the top of a cell.  Without a GPU, a simulated device counts every tensor
as the CUDA caching allocator would and raises real out-of-memory errors at
the capacity you give it (``--limit 4GiB`` or a card name such as ``T4``).
"""

from __future__ import annotations

from typing import Any

from .model.report import MIME_TYPE, SCHEMA_VERSION, Report, Suggestion
from .model.units import CARDS, format_bytes, parse_size
from .notebook.history import history, last_report

try:
    # Written by the build (hatch's version hook) from labextension/package.json:
    # one version for the Python package and the npm package.
    from ._version import __version__
except ImportError:  # a source tree that was never built or installed
    __version__ = "0+unknown"

__all__ = [
    "CARDS",
    "MIME_TYPE",
    "SCHEMA_VERSION",
    "Report",
    "Suggestion",
    "__version__",
    "census",
    "estimate",
    "format_bytes",
    "history",
    "last_report",
    "load_ipython_extension",
    "max_batch",
    "panel",
    "parse_size",
    "status",
    "unload_ipython_extension",
    "untracked",
]

_LOADED: dict[int, Any] = {}


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where JupyterLab finds the prebuilt sidebar (``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "oomnb"}]


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%gpumem``/``%%gpumem`` and start the simulated device if no GPU is usable."""
    from .notebook.magics import GpuMem

    key = id(ipython)
    if key in _LOADED:  # loaded twice: nothing more to do
        return
    magics = GpuMem(shell=ipython, parent=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
    backend = magics.backend()
    backend.ensure_started()
    if magics.auto:
        magics._set_hooks(True)
    _LOADED[key] = magics


def unload_ipython_extension(ipython: Any) -> None:
    """Remove every hook, magic and setting that loading added."""
    magics = _LOADED.pop(id(ipython), None)
    if magics is None:
        return
    magics.close()
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("gpumem", None)
    ipython.magics_manager.registry.pop(type(magics).__name__, None)
    if magics in ipython.configurables:
        ipython.configurables.remove(magics)


def status(device: str | None = None) -> dict[str, Any]:
    """The device's figures now, as plain data (bytes)."""
    backend = _backend(device)
    data = backend.snapshot().to_dict()
    data.update(kind=backend.kind, name=backend.name, index=backend.index)
    return data


def _backend(device: str | None) -> Any:
    from .backends import get_backend

    return _current_magics().backend(device) if _LOADED else get_backend(device)


def census(device: str | None = None) -> Any:
    """Every tensor the notebook keeps alive, with names: a :class:`~oomnb.analysis.census.Census`.

    In IPython this includes the output cache (``Out[n]``, ``_``) and the last
    traceback; in a plain script, the ``__main__`` namespace.
    """
    from .notebook.cleanup import in_ipython, shell_census

    backend = _backend(device)
    shell = in_ipython()
    if shell is not None:
        return shell_census(shell, backend)
    import __main__

    from .analysis.census import last_tracebacks, take_census

    variables = {k: v for k, v in vars(__main__).items() if not k.startswith("__")}
    return take_census(
        variables,
        tracebacks=last_tracebacks(),
        allocated_bytes=backend.snapshot().allocated_bytes,
        device="cpu" if backend.kind == "simulated" else f"cuda:{backend.index}",
    )


def panel(device: str | None = None) -> Any:
    """The cleanup panel (ipywidgets) for the running IPython shell."""
    from .notebook.cleanup import in_ipython
    from .notebook.panel import MemoryPanel

    shell = in_ipython()
    if shell is None:
        raise RuntimeError("oomnb.panel() needs IPython or Jupyter; use oomnb.census() in a script")
    return MemoryPanel(shell, _backend(device))


def estimate(step: Any, *args: Any, **kwargs: Any) -> Any:
    """Dry-run ``step(*args)`` on fake tensors: a :class:`~oomnb.analysis.estimator.DryRun` (no memory used).

    Keyword arguments: ``batch_size``, ``batch_dim``, ``autocast`` (a dtype),
    ``no_grad``, ``checkpoint``; the rest go to ``step``.
    """
    from .analysis.estimator import dry_run

    return dry_run(step, *args, **kwargs)


def max_batch(step: Any, *args: Any, limit: str | int, margin: float = 0.05, **kwargs: Any) -> Any:
    """The largest batch for which ``step(*args)`` fits ``limit`` (a size or a card), by dry runs."""
    from .analysis.estimator import find_max_batch
    from .model.units import parse_limit

    capacity, _ = parse_limit(limit)
    return find_max_batch(step, *args, capacity_bytes=capacity, margin=margin, **kwargs)


def untracked() -> Any:
    """Context manager: tensors created inside stay uncounted by the simulated device.

    For data sets and other things that on a real GPU would stay in host
    memory.  It changes nothing on CUDA.
    """
    from .backends.simulated import device

    return device.untracked()


def _current_magics() -> Any:
    return next(iter(_LOADED.values()))
