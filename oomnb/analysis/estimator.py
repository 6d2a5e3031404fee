"""Dry runs: how much memory a step needs, measured on fake tensors.

A dry run deep-copies the step's arguments (models, optimizers, tensors) into
fake tensors with ``FakeCopyMode`` (the user's objects are never touched), runs
the step under ``FakeTensorMode`` (shapes and dtypes, no storage), and counts
every fake storage with the same tracker as the simulated GPU, rounded like the
CUDA caching allocator.  So a dry run's peak is the peak the simulated device
would measure for the same step, without using memory or raising an OOM.

On top of single dry runs: the largest batch that fits (fit ``peak = fixed +
per_sample x batch``, check the fit, solve, verify with one more dry run), and
what-ifs (bf16 autocast, gradient checkpointing, ``torch.no_grad``).

Plain data in and out; no IPython.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

from ..allocator.tracker import SimulatedDevice
from ..allocator.tracker import device as simulated_device
from .hostcuda import FakeCopyFromCuda, cuda_as_host, in_forked_cuda_child

__all__ = ["BatchFit", "DryRun", "DryRunError", "dry_run", "find_max_batch", "what_ifs"]

# Optimizer state tensors per parameter, for the optimizers whose step cannot
# run on fake tensors (it reads a step count with .item()).
_STATE_TENSORS = {
    "Adam": 2,
    "AdamW": 2,
    "NAdam": 3,
    "RAdam": 2,
    "Adamax": 2,
    "SGD": 1,
    "RMSprop": 1,
    "Adagrad": 1,
    "Adadelta": 2,
    "ASGD": 2,
    "Rprop": 2,
}


class DryRunError(RuntimeError):
    """A step that cannot run on fake tensors (data-dependent ops, I/O, custom kernels)."""


@dataclass
class DryRun:
    """Figures of one dry run, in bytes as the CUDA allocator would count them."""

    batch_size: int | None
    peak_bytes: int
    start_bytes: int
    end_bytes: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    inputs_bytes: int
    notes: list[str] = field(default_factory=list)
    #: What the caching allocator reserved at the peak and at the start.
    peak_reserved_bytes: int = 0
    start_reserved_bytes: int = 0
    #: The run went on from the simulated device's own allocator (its other
    #: tensors and its fragmentation): the reserved figures are the device's.
    whole_device: bool = False
    #: Whether a fit is judged by reserved memory (a card runs out when its
    #: reserved segments fill it) rather than by allocated bytes.
    by_reserved: bool = False
    #: The allocator had to go past the capacity: on the device this is an OOM.
    over_capacity: bool = False
    #: With ``checkpoint``: the code that does to the user's model what the
    #: dry run did to its copy (empty where a model is not named).
    checkpoint_code: str = ""

    @property
    def activations_bytes(self) -> int:
        """Peak above what existed at the start: activations and temporaries."""
        return max(0, self.peak_bytes - self.start_bytes)

    def footprint(self, baseline: int) -> int:
        """What the device would hold at this run's peak, where it holds ``baseline`` allocated bytes now.

        By reserved memory where the run says so: the device's own reserved
        peak when it went on from the device's allocator, else the baseline
        plus what the run reserved above what it started with.
        """
        if not self.by_reserved:
            return baseline + max(0, self.peak_bytes - self.start_bytes)
        if self.whole_device:
            return max(self.peak_reserved_bytes, baseline + max(0, self.peak_bytes - self.start_bytes))
        return baseline + max(0, self.peak_reserved_bytes - self.start_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["activations_bytes"] = self.activations_bytes
        return data


@dataclass
class BatchFit:
    """The largest batch that fits, found by dry runs."""

    capacity_bytes: int
    margin: float
    fixed_bytes: int
    per_sample_bytes: float
    max_batch: int
    verified_peak_bytes: int
    runs: list[DryRun]
    fit_error: float
    original_batch: int | None = None

    @property
    def budget_bytes(self) -> int:
        return int(self.capacity_bytes * (1 - self.margin))

    def accumulation_steps(self) -> int | None:
        """Steps of gradient accumulation that keep the original effective batch."""
        if not self.original_batch or not self.max_batch:
            return None
        return math.ceil(self.original_batch / self.max_batch)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budget_bytes"] = self.budget_bytes
        data["accumulation_steps"] = self.accumulation_steps()
        return data


# -- the fake world -------------------------------------------------------------------
def _fake_copy(mode: FakeTensorMode, value: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    # A random generator (a DataLoader's sampler, a Trainer's) is shared, not
    # copied: its state cannot be restored into a fake tensor, and the copy
    # never runs anywhere the user's generator is seen.
    # So are open files, streams and locks (a progress bar a Trainer's
    # callback keeps): they cannot be copied, and a dry run's child has its
    # descriptors on /dev/null anyway.
    dispatch: dict[type, Any] = copy._deepcopy_dispatch  # type: ignore[attr-defined]
    shared = _SHARED_TYPES + _loaded_shared_types()
    previous = {kind: dispatch.get(kind) for kind in shared}
    for kind in shared:
        dispatch[kind] = _shared
    copier = FakeCopyFromCuda(mode) if in_forked_cuda_child() else FakeCopyMode(mode)
    memo: dict[int, Any] = {}
    try:
        with copier:
            copied = copy.deepcopy(value, memo)
        if pairs is not None:
            # deepcopy keeps every original it copied alive in memo[id(memo)].
            for original in memo.get(id(memo), []):
                if isinstance(original, torch.Tensor) and isinstance(memo.get(id(original)), torch.Tensor):
                    pairs.append((original, memo[id(original)]))
        return copied
    finally:
        for kind, before in previous.items():
            if before is None:
                dispatch.pop(kind, None)
            else:
                dispatch[kind] = before


def _shared(value: Any, memo: Any) -> Any:
    return value


#: Library objects a dry run never needs copied, where those libraries are loaded: a
#: Trainer's callbacks (progress bars with their streams) run in the loop, not in a step.
_SHARED_BY_NAME = (
    ("transformers.trainer_callback", "CallbackHandler"),
    ("tqdm.std", "tqdm"),
    ("tqdm.auto", "tqdm"),
    ("tqdm.notebook", "tqdm_notebook"),
)


def _loaded_shared_types() -> tuple[type, ...]:
    found = []
    for module_name, name in _SHARED_BY_NAME:
        module = sys.modules.get(module_name)
        kind = getattr(module, name, None) if module is not None else None
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


_SHARED_TYPES: tuple[type, ...] = (
    torch.Generator,
    io.TextIOWrapper,
    io.BufferedWriter,
    io.BufferedReader,
    io.BufferedRandom,
    io.FileIO,
    type(threading.Lock()),
    type(threading.RLock()),
)


def _resize_batch(mode: FakeTensorMode, value: Any, old: int | None, new: int | None, dim: int) -> Any:
    """Fake tensors whose batch dimension is ``old`` get batch ``new`` (also inside lists, tuples, dicts)."""
    if old is None or new is None or old == new:
        return value
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        if value.dim() > dim and value.shape[dim] == old:
            shape = list(value.shape)
            shape[dim] = new
            with mode:
                return torch.empty(shape, dtype=value.dtype, device=value.device).requires_grad_(value.requires_grad)
        return value
    if isinstance(value, list):
        return [_resize_batch(mode, v, old, new, dim) for v in value]
    if isinstance(value, tuple):
        return tuple(_resize_batch(mode, v, old, new, dim) for v in value)
    if isinstance(value, dict):
        return {k: _resize_batch(mode, v, old, new, dim) for k, v in value.items()}
    return value


def _find_batch(value: Any, dim: int) -> int | None:
    """The batch size of the first input tensor (not a parameter, not inside a module)."""
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        return int(value.shape[dim]) if value.dim() > dim else None
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _find_batch(item, dim)
            if found is not None:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _find_batch(item, dim)
            if found is not None:
                return found
    return None


def _walk(value: Any, depth: int = 4, seen: set[int] | None = None) -> Iterator[Any]:
    """``value`` and what it holds: container items and the attributes of ordinary
    objects (a trainer's model), each once."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    yield value
    if depth <= 0 or isinstance(value, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)):
        return
    items: Any = ()
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = value
    elif isinstance(getattr(value, "__dict__", None), dict) and not callable(value):
        items = list(vars(value).values())
    for item in items:
        yield from _walk(item, depth - 1, seen)


def _bytes_of(tensors: Iterator[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[id(storage)] = -(-storage.nbytes() // 512) * 512
    return sum(seen.values())


def _state_tensors(opt: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def _guard_optimizer_step(opt: torch.optim.Optimizer, notes: list[str]) -> None:
    """Let an optimizer whose step reads data (``.item()``) still be dry-run.

    Its state is created from its own ``_init_group`` where the step got that
    far; whatever is missing is allocated per its kind, plus one temporary the
    size of the largest parameter, as the update itself needs.
    """
    original = opt.step

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            kind = type(opt).__name__
            count = _STATE_TENSORS.get(kind)
            if count is None:
                raise DryRunError(f"{kind}.step cannot run on fake tensors ({type(exc).__name__})") from exc
            largest = None
            for group in opt.param_groups:
                momentum = group.get("momentum", 1) if kind in ("SGD", "RMSprop") else 1
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = opt.state[p]
                    have = sum(1 for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape)
                    need = count if momentum else 0
                    for i in range(have, need):
                        state[f"_oomnb_state_{i}"] = torch.zeros_like(p)
                    if largest is None or p.numel() > largest.numel():
                        largest = p
            if largest is not None:
                temporary = torch.empty_like(largest)
                del temporary
            notes.append(f"{kind}.step reads its step count with .item(): its update was simulated")
            return None

    opt.step = step  # type: ignore[method-assign]


@contextlib.contextmanager
def _fake_values(notes: list[str]) -> Iterator[None]:
    """Let fake tensors answer ``.item()`` (with 1) for the dry run's duration.

    Training cells log ``loss.item()``; Adam reads its step count the same
    way.  The value does not change how much memory the step takes, so the dry
    run goes on and says so.  Real tensors answer as usual.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    names = ("item", "__float__", "__int__", "__index__", "__bool__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    convert: dict[str, Callable[[Any], Any]] = {
        "item": lambda v: v,
        "__float__": float,
        "__int__": int,
        "__index__": int,
        "__bool__": bool,
    }

    def patched(name: str) -> Any:
        original = originals[name]

        def method(self: torch.Tensor) -> Any:
            if not isinstance(self, FakeTensor):
                return original(self)
            if not any(n.startswith("values read with .item()") for n in notes):
                notes.append("values read with .item() were taken as 1 in the dry run")
            return convert[name](False if self.dtype == torch.bool else 1)

        return method

    for name in names:
        setattr(torch.Tensor, name, patched(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _measure(
    mode: FakeTensorMode,
    roots: Any,
    inputs: list[torch.Tensor],
    run: Callable[[], Any],
    *,
    autocast: torch.dtype | None,
    no_grad: bool,
    checkpoint: bool,
    batch_size: int | None = None,
    names: dict[int, str] | None = None,
    pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    alloc_conf: str | None = None,
) -> DryRun:
    """Run ``run()`` under ``mode`` and count the fake storages it allocates.

    ``roots`` hold the fake copies (models, optimizers, tensors); what they
    hold before the run is the start, and the peak is measured from there.
    ``pairs`` (original, fake copy) let the run go on from the simulated
    device's allocator: each copy takes its original's block.  With
    ``alloc_conf`` (``PYTORCH_CUDA_ALLOC_CONF`` text) the device's tensors are
    first allocated again, in the order they were, by an allocator so set up:
    the notebook as it would be after a restart with that setting.
    """
    notes: list[str] = []
    modules = [v for v in _walk(roots) if isinstance(v, torch.nn.Module)]
    optimizers = [v for v in _walk(roots) if isinstance(v, torch.optim.Optimizer)]
    for opt in optimizers:
        _guard_optimizer_step(opt, notes)
    checkpoint_code = ""
    if checkpoint:
        wrapped = 0
        snippets = []
        for module in modules:
            count, where = _checkpoint_blocks(module)
            wrapped += count
            name = (names or {}).get(id(module))
            if count and name is not None and where is not None:
                snippets.append(_checkpoint_snippet(name, where, module))
        if not wrapped:
            raise DryRunError("no repeated blocks to checkpoint (a ModuleList or Sequential of like layers)")
        notes.append(f"checkpointed {wrapped} blocks")
        checkpoint_code = "\n\n".join(snippets)
    params = [p for m in modules for p in m.parameters()]
    buffers = [b for m in modules for b in m.buffers()]
    tracker = SimulatedDevice(track_device="meta")
    whole_device, by_reserved, blocks = _start_allocator(tracker, pairs, alloc_conf)
    context = contextlib.ExitStack()
    try:
        # The simulated GPU must not see the fake world (its factories would
        # be checked against the real capacity).
        with simulated_device.untracked(), mode:
            tracker.start(scan=False)
            if whole_device:
                _adopt_blocks(tracker, pairs or [], blocks)
            for t in [*params, *buffers, *inputs]:
                tracker.register(t)
            for p in params:
                if p.grad is not None:
                    tracker.register(p.grad)
            for opt in optimizers:
                for t in _state_tensors(opt):
                    tracker.register(t)
            start = tracker.allocated
            start_reserved = tracker.reserved
            tracker.reset_peak()
            if in_forked_cuda_child():
                context.enter_context(cuda_as_host())
            if autocast is not None:
                # The device type of the cell's own tensors: what the user's
                # torch.autocast(...) will name.
                on_cuda = any(t.device.type == "cuda" for t in [*params, *inputs])
                context.enter_context(torch.autocast("cuda" if on_cuda else "cpu", dtype=autocast))
            if no_grad:
                context.enter_context(torch.no_grad())
            context.enter_context(_fake_values(notes))
            with context:
                result = run()
            del result
            end = tracker.allocated
            peak = tracker.peak
            peak_reserved = tracker.peak_reserved
            over = tracker.alloc.overcommitted > 0
    except DryRunError:
        raise
    except Exception as exc:
        raise DryRunError(_why(exc)) from exc
    finally:
        tracker.stop()
    return DryRun(
        batch_size=batch_size,
        peak_bytes=peak,
        start_bytes=start,
        end_bytes=end,
        parameters_bytes=_bytes_of(iter(params)),
        gradients_bytes=_bytes_of(p.grad for p in params if p.grad is not None),
        optimizer_bytes=_bytes_of(t for opt in optimizers for t in _state_tensors(opt)),
        inputs_bytes=_bytes_of(iter(inputs)),
        notes=notes,
        checkpoint_code=checkpoint_code,
        peak_reserved_bytes=peak_reserved,
        start_reserved_bytes=start_reserved,
        whole_device=whole_device,
        by_reserved=by_reserved,
        over_capacity=over,
    )


def _start_allocator(
    tracker: SimulatedDevice, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None, alloc_conf: str | None = None
) -> tuple[bool, bool, dict[int, Any]]:
    """Give the dry run's tracker the allocator it counts with.

    Returns (went on from the device's allocator, fits go by reserved, the
    copy's block of each device storage by storage id).

    Where the simulated device models the cache and the originals are known, the
    run goes on from a copy of the device's own allocator (other tensors,
    cached segments, fragmentation and capacity): its reserved peak is the
    device's.  A forked CUDA child starts from an empty one, as do runs where
    the device does not model the cache (then fits go by allocated bytes).
    """
    from ..allocator.caching import CachingAllocator, parse_alloc_conf

    device = simulated_device
    cuda_child = in_forked_cuda_child()
    modelled = device.active and device.caching and device.track_device == "cpu" and not cuda_child
    conf = parse_alloc_conf(alloc_conf) if alloc_conf is not None else device.alloc.conf
    tracker.workspace_due = device.workspace_due
    if modelled and pairs is not None:
        if alloc_conf is None:
            twin, blocks = device.allocator_copy()
        else:
            twin, blocks = device.replayed(conf)
        twin.overcommit = True
        tracker.alloc = twin
        return True, True, blocks
    # Counted as the device counts: block by block where the cache is modelled
    # (or on a card), else each storage rounded to 512 B.
    tracker.alloc = CachingAllocator(None, conf, caching=device.caching or cuda_child)
    return False, modelled or cuda_child, {}


def _adopt_blocks(
    tracker: SimulatedDevice, pairs: list[tuple[torch.Tensor, torch.Tensor]], blocks: dict[int, Any]
) -> None:
    """Each fake copy holds the block its original holds on the simulated device.

    Originals that the device does not count (data kept on the host) leave
    their copies uncounted too.
    """
    device = simulated_device
    for original, fake in pairs:
        try:
            key = id(original.untyped_storage())
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        block = blocks.get(key)
        if block is not None:
            tracker.adopt(fake, block)
        elif key not in device._live:
            tracker.ignore(fake)
    # The run alone decides which copies live on.
    pairs.clear()


def dry_run(
    step: Callable[..., Any],
    *args: Any,
    batch_size: int | None = None,
    batch_dim: int = 0,
    autocast: torch.dtype | None = None,
    no_grad: bool = False,
    checkpoint: bool = False,
    **kwargs: Any,
) -> DryRun:
    """Run ``step(*args, **kwargs)`` on fake copies of its arguments and measure its peak.

    Parameters
    ----------
    step
        A function that takes models, optimizers and tensors (a training or
        evaluation step).
    batch_size
        Run with this batch size instead of the one the example tensors have:
        every input tensor whose ``batch_dim`` equals the first input's batch
        size is resized.
    autocast
        Run under ``torch.autocast`` with this dtype (bf16 or fp16).
    no_grad
        Run under ``torch.no_grad()``.
    checkpoint
        Wrap the model's repeated blocks in activation checkpointing.

    Raises
    ------
    DryRunError
        With one line saying why the step cannot run on fake tensors.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    original_batch = _find_batch((args, kwargs), batch_dim)
    # Real objects are copied, never touched; the simulated GPU must not see
    # the copies (they are fake).
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with simulated_device.untracked():
        fake_args, fake_kwargs = _fake_copy(mode, (args, kwargs), pairs)
        fake_args = _resize_batch(mode, fake_args, original_batch, batch_size, batch_dim)
        fake_kwargs = _resize_batch(mode, fake_kwargs, original_batch, batch_size, batch_dim)
    inputs = [
        t
        for t in _walk((fake_args, fake_kwargs))
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)
    ]
    return _measure(
        mode,
        (fake_args, fake_kwargs),
        inputs,
        lambda: step(*fake_args, **fake_kwargs),
        autocast=autocast,
        no_grad=no_grad,
        checkpoint=checkpoint,
        batch_size=batch_size if batch_size is not None else original_batch,
        pairs=pairs,
    )


def _why(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "DataDependent" in name or "DynamicOutputShape" in name or "data-dependent" in text or "item()" in text:
        return f"the step reads tensor values (.item(), data-dependent shapes): {name}"
    if isinstance(exc, OSError):
        return f"the step does file or network I/O: {name}: {text[:120]}"
    if "Unsupported" in name or "not implemented" in text.lower():
        return f"an operation has no fake-tensor implementation (custom kernel?): {text[:120]}"
    return f"{name}: {text[:160]}"


_CHECKPOINT_HELPER = """from torch.utils.checkpoint import checkpoint


def checkpointed(block):
    forward = block.forward
    block.forward = lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)
"""


def _hf_enable(module: Any) -> Any:
    """transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)."""
    return getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable


def _hf_kwargs(enable: Any) -> str:
    return (
        "activation_checkpointing_kwargs"
        if enable.__name__ == "activation_checkpointing_enable"
        else "gradient_checkpointing_kwargs"
    )


def _checkpoint_snippet(name: str, where: str, module: Any = None) -> str:
    """What does to the model named ``name`` what :func:`_checkpoint_blocks` did to its copy."""
    if where == "hf":
        enable = _hf_enable(module)
        return (
            f'{name}.{enable.__name__}({_hf_kwargs(enable)}={{"use_reentrant": False}})\n'
            f"{name}.config.use_cache = False  # a key/value cache and recomputation do not mix"
        )
    blocks = name if where == "" else f'{name}.get_submodule("{where}")'
    return f"{_CHECKPOINT_HELPER}\n\nfor block in {blocks}:\n    checkpointed(block)"


def _checkpoint_blocks(module: torch.nn.Module) -> tuple[int, str | None]:
    """Checkpoint ``module``'s repeated blocks; returns how many, and where: ``"hf"``
    for a Hugging Face model (its own ``gradient_checkpointing_enable``), else the
    qualified name of the biggest ModuleList or Sequential of like blocks."""
    from torch.utils.checkpoint import checkpoint

    if getattr(module, "supports_gradient_checkpointing", False) and hasattr(module, "gradient_checkpointing_enable"):
        enable: Any = _hf_enable(module)
        enable(**{_hf_kwargs(enable): {"use_reentrant": False}})
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            # Recomputation with a key/value cache on appends keys twice.
            config.use_cache = False
        count = sum(1 for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True)
        return max(count, 1), "hf"
    best: list[torch.nn.Module] = []
    best_name: str | None = None
    for qualified, sub in module.named_modules():
        if isinstance(sub, (torch.nn.ModuleList, torch.nn.Sequential)):
            children = list(sub.children())
            kinds = {type(c) for c in children}
            size = sum(p.numel() for c in children for p in c.parameters())
            if len(children) >= 2 and len(kinds) == 1 and size > sum(p.numel() for c in best for p in c.parameters()):
                best, best_name = children, qualified
    for block in best:
        forward = block.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return len(best), best_name


def search_batch(
    run_at: Callable[[int], DryRun],
    original: int | None,
    budget_bytes: int,
    capacity_bytes: int,
    margin: float,
    baseline_bytes: int = 0,
) -> BatchFit:
    """The largest batch ``b`` with ``run_at(b).peak_bytes <= budget_bytes``.

    Three dry runs fit ``peak = fixed + per_sample x batch``; the solution is
    then checked by dry runs and walked to the exact boundary (memory is a
    staircase, not a line: 512-byte rounding, kernels that change algorithm).
    """
    base = original or 8
    sizes = sorted({max(1, base // 4), max(2, base // 2), max(3, base)})
    runs = [run_at(b) for b in sizes]
    xs = [float(r.batch_size or b) for r, b in zip(runs, sizes, strict=True)]
    ys = [float(r.peak_bytes) for r in runs]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs) or 1.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    fixed = mean_y - slope * mean_x
    fit_error = max(abs(fixed + slope * x - y) / max(y, 1.0) for x, y in zip(xs, ys, strict=True))
    guess = int(max(xs)) if slope <= 0 else max(0, int((budget_bytes - fixed) // slope))
    peaks: dict[int, int] = {int(x): int(y) for x, y in zip(xs, ys, strict=True)}

    def fits(b: int) -> bool:
        if b < 1:
            return True
        if b not in peaks:
            run = run_at(b)
            runs.append(run)
            peaks[b] = run.peak_bytes
        return peaks[b] <= budget_bytes

    if fits(guess):
        low, high = guess, guess + max(1, guess // 50)
        while fits(high):  # the line undershot: step up
            low, high = high, high + max(1, high // 10)
    else:
        low, high = 0, guess
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    best = low
    return BatchFit(
        capacity_bytes=capacity_bytes,
        margin=margin,
        fixed_bytes=int(fixed) + baseline_bytes,
        per_sample_bytes=slope,
        max_batch=best,
        verified_peak_bytes=(peaks.get(best, 0) + baseline_bytes) if best else 0,
        runs=runs,
        fit_error=fit_error,
        original_batch=original,
    )


def find_max_batch(
    step: Callable[..., Any],
    *args: Any,
    capacity_bytes: int,
    margin: float = 0.05,
    batch_dim: int = 0,
    baseline_bytes: int = 0,
    **kwargs: Any,
) -> BatchFit:
    """The largest batch whose dry-run peak fits ``capacity_bytes`` with ``margin`` to spare.

    ``baseline_bytes`` is memory the device holds besides the step's own
    arguments (other variables of the notebook).  The answer is verified by a
    dry run at that batch and never exceeds the budget.
    """
    original = _find_batch((args, kwargs), batch_dim)
    budget = int(capacity_bytes * (1 - margin)) - baseline_bytes

    def run_at(b: int) -> DryRun:
        return dry_run(step, *args, batch_size=b, batch_dim=batch_dim, **kwargs)

    return search_batch(run_at, original, budget, capacity_bytes, margin, baseline_bytes)


def dry_run_cell(
    code: Any,
    namespace: dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    autocast: torch.dtype | None = None,
    no_grad: bool = False,
    checkpoint: bool = False,
    alloc_conf: str | None = None,
) -> DryRun:
    """Run a notebook cell's compiled ``code`` with ``namespace`` as its globals, on fake tensors.

    Every value of ``namespace`` that holds tensors (models, optimizers,
    tensors, containers and objects holding them) is replaced by a fake copy,
    all copied together so that sharing is kept (an optimizer still points at
    its model's parameters); ``overrides`` (``{"batch_size": 64}``) replace
    values.  The namespace itself is changed, because functions defined in
    earlier cells find ``model`` and ``opt`` through it: **call this only
    where changes cannot reach the user**, in a child of
    :func:`oomnb.analysis.isolation.run_isolated`.
    """
    from .sizes import Resized

    _whole_batches_from_tensor_datasets()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    heavy = _heavy_names(code, namespace)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with simulated_device.untracked():
        fake = _fake_copy(mode, heavy, pairs)
    namespace.update(fake)
    for name, value in (overrides or {}).items():
        # A callable override (``sizes.Resized``) derives the value from the
        # name's fake copy: the same tensor with another shape, fake too.
        if isinstance(value, Resized):
            with mode:
                value = value(namespace.get(name))
        namespace[name] = value
    roots = list(fake.values())
    tensors = [t for t in _walk(roots) if isinstance(t, torch.Tensor)]

    def run() -> None:
        exec(code, namespace)  # noqa: S102 - the user's own cell, on fake copies, isolated

    names = {id(value): name for name, value in fake.items()}
    return _measure(
        mode,
        roots,
        tensors,
        run,
        autocast=autocast,
        no_grad=no_grad,
        checkpoint=checkpoint,
        names=names,
        pairs=pairs,
        alloc_conf=alloc_conf,
    )


def _whole_batches_from_tensor_datasets() -> None:
    """A DataLoader over a TensorDataset fetches a batch with one index per tensor, not one per sample.

    The default fetcher indexes the dataset sample by sample and stacks the
    rows: thousands of fake operations for one batch, seconds of a dry run's
    budget.  Indexing each tensor with the batch's indices gives the same
    tensors (same shapes, dtypes, bytes).  Patched in the isolated child only.
    """
    from torch.utils.data import TensorDataset
    from torch.utils.data._utils import collate, fetch

    fetcher = fetch._MapDatasetFetcher
    if getattr(fetcher, "_oomnb_whole_batches", False):
        return
    original = fetcher.fetch

    def fetch_batch(self: Any, possibly_batched_index: Any) -> Any:
        if self.auto_collation and type(self.dataset) is TensorDataset and self.collate_fn is collate.default_collate:
            index = torch.as_tensor(list(possibly_batched_index), dtype=torch.long)
            return [t[index] for t in self.dataset.tensors]
        return original(self, possibly_batched_index)

    fetcher.fetch = fetch_batch  # type: ignore[method-assign]
    fetcher._oomnb_whole_batches = True  # type: ignore[attr-defined]


def probe_cell(
    code: Any,
    namespace: dict[str, Any],
    overrides: dict[str, Any],
    *,
    allocated: Callable[[], int],
    peak: Callable[[], int],
    reset_peak: Callable[[], None],
) -> int:
    """One real run of the cell: the bytes it grew by at its peak.

    For cells a dry run cannot take.  It runs for real with ``namespace`` as
    its globals: **call this only in an isolated child** (it trains what the
    cell trains, there), and never on CUDA (a forked child cannot use it).
    """
    namespace.update(overrides)
    start = allocated()
    reset_peak()
    exec(code, namespace)  # noqa: S102 - the user's own cell, isolated
    return peak() - start


# IPython's own names (the output cache, input history): never copied.
_IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython)$")


def _heavy_names(code: Any, namespace: dict[str, Any]) -> dict[str, Any]:
    """The names whose values hold tensors: what a dry run replaces by fake copies.

    Every such name, not only those the cell's code names: a function defined
    in an earlier cell reaches ``model`` and ``opt`` as globals.
    """
    from .census import holds_tensors

    used = set(code.co_names)
    return {
        name: value
        for name, value in namespace.items()
        if (name in used or not _IPYTHON_NAMES.match(name)) and not name.startswith("__") and holds_tensors(value)
    }


def what_ifs(
    step: Callable[..., Any],
    *args: Any,
    bf16_supported: bool | None = True,
    batch_dim: int = 0,
    **kwargs: Any,
) -> dict[str, DryRun | str]:
    """Dry runs of the step as it is and with each change; a string says why one could not run."""
    results: dict[str, DryRun | str] = {}
    variants: dict[str, dict[str, Any]] = {
        "as is": {},
        "bf16 autocast": {"autocast": torch.bfloat16},
        "gradient checkpointing": {"checkpoint": True},
        "no_grad": {"no_grad": True},
    }
    for name, options in variants.items():
        try:
            results[name] = dry_run(step, *args, batch_dim=batch_dim, **options, **kwargs)
        except DryRunError as exc:
            results[name] = str(exc)
    return results
