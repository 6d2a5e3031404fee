"""A GPU simulated on the CPU: exact allocation accounting and real OOMs.

While it is active, a ``TorchDispatchMode`` sees every ATen operation, and
every storage an operation produces (or consumes, for tensors made in other
ways) is registered once, with a weak reference whose callback subtracts its
bytes when the storage dies.  PyTorch keeps a storage's Python object alive
for as long as its C++ storage lives, so that callback fires exactly when the
memory would be returned to the CUDA caching allocator.  Sizes are rounded the
way that allocator rounds them (multiples of 512 bytes), so ``allocated``
equals what ``torch.cuda.memory_allocated`` reports for the same tensors.

Every storage goes through a model of the CUDA caching allocator
(:mod:`.caching`): its blocks, segments and cache, so ``reserved`` is what
``torch.cuda.memory_reserved`` would say and fragmentation happens as it does
on a card.  ``OOMNB_ALLOCATOR=exact`` (or ``%gpumem allocator exact``) turns
the cache off: each storage is then its own exact segment.

With a capacity, a storage the allocator cannot place (after giving back the
cached segments that are wholly free, as CUDA's does) raises a real
``torch.OutOfMemoryError`` whose message has CUDA's shape and says that the
device is simulated.  Factory operations (``empty``, ``zeros``, ``randn``
...) are checked before anything is allocated; other operations are checked
on their outputs, which are dropped before the error is raised.  If the CPU
itself cannot allocate, that failure is reported as the simulated OOM too.
A named card holds its CUDA context outside the allocator and reserves
cuBLAS's workspace at the first matrix product.

What it does not model: more than one stream, allocation-size bucketing for
the "Tried to allocate" figure, and workspaces that other CUDA libraries
(cuDNN, NCCL) allocate inside kernels.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..model.units import Card, format_size_like_torch
from .caching import Block, CachingAllocator, parse_alloc_conf
from .oom import parse_oom_message

__all__ = ["SimulatedDevice", "device"]

_aten = torch.ops.aten


def _caching_from_environment() -> bool:
    """Whether the caching allocator's cache is modelled: yes, unless ``OOMNB_ALLOCATOR=exact``.

    ``exact`` is the earlier model (each storage its own exact segment,
    reserved equals allocated), kept for comparison and for the benchmark.
    """
    return os.environ.get("OOMNB_ALLOCATOR", "").strip().lower() != "exact"


def _conf_from_environment() -> Any:
    """``PYTORCH_CUDA_ALLOC_CONF`` as the process was started with (defaults if unset or unreadable)."""
    from .caching import AllocConf

    try:
        return parse_alloc_conf(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    except ValueError as exc:
        import warnings

        # PyTorch would refuse to start CUDA with it: say so once, and go on with the defaults.
        warnings.warn(f"oomnb: {exc}; the simulated device uses the defaults", stacklevel=2)
        return AllocConf()


# Factory ops whose first argument is the size: their bytes are known before
# anything is allocated, so a huge request never touches host memory.
_SIZED_FACTORIES = {
    _aten.empty.memory_format,
    _aten.zeros.default,
    _aten.ones.default,
    _aten.full.default,
    _aten.rand.default,
    _aten.randn.default,
    _aten.empty_strided.default,
}
_RANDINT = {_aten.randint.default: 1, _aten.randint.low: 2}


def _factory_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Bytes a factory op will allocate, or None when ``func`` is not one."""
    if func is _aten.full.default and kwargs.get("dtype") is None:
        return None  # the dtype follows the fill value: let the output tell
    if func in _SIZED_FACTORIES:
        size = args[0] if args else kwargs.get("size")
    elif func in _RANDINT:
        position = _RANDINT[func]
        size = args[position] if len(args) > position else kwargs.get("size")
    else:
        return None
    if size is None:
        return None
    default = torch.int64 if func in _RANDINT else torch.get_default_dtype()
    dtype = kwargs.get("dtype") or default
    numel = 1
    for dim in size:
        numel *= int(dim)
    if func is _aten.empty_strided.default:
        stride = args[1] if len(args) > 1 else kwargs.get("stride", ())
        numel = 1 + sum((int(d) - 1) * int(s) for d, s in zip(size, stride, strict=False)) if numel else 0
    return numel * dtype.itemsize


# The matrix products that go to cuBLAS: the first one on a card takes cuBLAS's workspace.
_BLAS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.mv.default,
    _aten.addmv.default,
    _aten._addmm_activation.default,
}

_OP_FACTS: dict[Any, tuple[bool, bool]] = {}


_RESIZING = {"aten::resize_", "aten::resize_as_", "aten::set_", "aten::_resize_output_", "aten::resize_as_sparse_"}


def _op_facts(func: Any) -> tuple[bool, bool]:
    """(is a sized factory, may resize a storage in place), cached per op.

    In-place ops such as ``add_`` never change a storage's size; ``out=``
    variants and ``resize_``/``set_`` can.
    """
    facts = _OP_FACTS.get(func)
    if facts is None:
        try:
            schema = func._schema
            resizes = schema.name in _RESIZING or any(arg.is_out for arg in schema.arguments)
        except Exception:
            resizes = True
        facts = (func in _SIZED_FACTORIES or func in _RANDINT, resizes)
        _OP_FACTS[func] = facts
    return facts


class _TrackingMode(TorchDispatchMode):
    """Sees every ATen op on this thread and registers the storages it touches.

    This runs once per operator call, so it is written for speed: one cached
    lookup per op, and a dict membership test per tensor already known.
    """

    def __init__(self, owner: SimulatedDevice) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        owner = self.owner
        if kwargs is None:
            kwargs = {}
        if owner.paused:
            out = func(*args, **kwargs)
            owner.ignore(out)
            return out
        if owner.workspace_due and func in _BLAS:
            owner.take_workspace()
        factory, resizes = _OP_FACTS.get(func) or _op_facts(func)
        if factory and owner.capacity is not None:
            device = kwargs.get("device")
            # Factories for other devices (meta, inside dry runs) take nothing here.
            planned = None
            if device is None or torch.device(device).type == owner.track_device:
                planned = _factory_bytes(func, args, kwargs)
            if planned is not None:
                owner.check_request(planned)
        live = owner._live
        # Tensors made outside any op (torch.from_numpy, other threads, before
        # the device started) are registered the first time an op uses them.
        for arg in args:
            if isinstance(arg, torch.Tensor) and id(arg.untyped_storage()) not in live:
                owner.register(arg)
        try:
            out = func(*args, **kwargs)
        except RuntimeError as exc:
            if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
                owner.raise_oom(owner.guess_request(str(exc)), from_host=True)
            raise
        request = 0
        if isinstance(out, torch.Tensor):
            if resizes or id(out.untyped_storage()) not in live:
                request = owner.register(out, check=True)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor) and (resizes or id(item.untyped_storage()) not in live):
                    request = owner.register(item, check=True)
                    if request < 0:
                        break
        if request < 0:
            # An output would not fit: drop it before raising, so that the
            # traceback does not keep it alive.
            del out
            owner.raise_oom(-request)
        return out


class SimulatedDevice:
    """Process-wide accounting for the simulated GPU.

    One instance (:data:`device`) serves the whole process; the extension
    starts it on load and stops it on unload.  All figures are bytes as the
    CUDA caching allocator would count them.
    """

    name = "simulated"

    def __init__(self, track_device: str = "cpu") -> None:
        #: The device type whose storages count: "cpu" for the simulated GPU,
        #: "meta" for dry runs on fake tensors.
        self.track_device = track_device
        #: The caching allocator every storage goes through (reserved, segments, fragmentation).
        self.alloc = CachingAllocator(conf=_conf_from_environment(), caching=_caching_from_environment())
        self._capacity: int | None = None
        #: Memory the process holds outside PyTorch (the CUDA context, library
        #: workspaces): the allocator may reserve the capacity less this.
        self._context = 0
        self.card: Card | None = None
        #: cuBLAS's workspace, taken from the allocator at the first matrix
        #: product on a named card (bytes still to take, and the block once taken).
        self.workspace_due = 0
        self.workspace: Block | int | None = None
        self.paused = 0
        self.num_ooms = 0
        #: Exact figures of the last simulated OOM: (requested, allocated, capacity, reserved).
        self.last_oom: tuple[int, int, int, int] | None = None
        self._live: dict[int, tuple[weakref.ref[Any], int, Block | int]] = {}
        self._ignored: dict[int, weakref.ref[Any]] = {}
        self._mode: _TrackingMode | None = None
        self._lock = threading.RLock()
        self._users = 0

    # -- figures ----------------------------------------------------------
    @property
    def allocated(self) -> int:
        return self.alloc.allocated

    @property
    def peak(self) -> int:
        return self.alloc.peak_allocated

    @property
    def reserved(self) -> int:
        return self.alloc.reserved

    @property
    def peak_reserved(self) -> int:
        return self.alloc.peak_reserved

    @property
    def capacity(self) -> int | None:
        """The card's capacity (what its OOM messages call total capacity); None: no limit."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int | None) -> None:
        self._capacity = value
        self.alloc.capacity = None if value is None else max(0, value - self._context)

    @property
    def context(self) -> int:
        """Non-PyTorch memory: what the CUDA context and libraries hold of the capacity."""
        return self._context

    @context.setter
    def context(self, value: int) -> None:
        self._context = max(0, int(value))
        self.capacity = self._capacity

    @property
    def caching(self) -> bool:
        """Whether the allocator's cache is modelled (reserved can exceed allocated)."""
        return self.alloc.caching

    @caching.setter
    def caching(self, on: bool) -> None:
        """Switch models; the live storages are allocated again under the new one, in the order they came.

        So the figures afterwards are those of a notebook run with that model
        from the start (what it had cached is not carried over): with the
        cache off, reserved equals allocated again.
        """
        on = bool(on)
        if on != self.alloc.caching:
            self.repack(caching=on)

    def repack(self, caching: bool | None = None) -> None:
        """Allocate the live storages again, in the order they came, on a fresh allocator.

        What a restarted notebook that made the same tensors would hold: the
        cache and the gaps dead tensors left are gone.  ``caching`` switches
        the model at the same time.
        """
        with self._lock:
            old = self.alloc
            on = old.caching if caching is None else caching
            self.alloc = CachingAllocator(old.capacity, old.conf, caching=on)
            self.alloc.num_ooms = old.num_ooms
            if self.workspace is not None:
                size = self.workspace.requested if isinstance(self.workspace, Block) else self.workspace
                self.workspace = self._take(size, False) if size else None
            for key, (ref, nbytes, _held) in list(self._live.items()):
                if key not in self._live or ref() is None:
                    continue  # died meanwhile: its release already gave its old block back
                held = self._take(nbytes, False)
                self._live[key] = (ref, nbytes, held if held is not None else 0)
            self.alloc.reset_peak()

    def set_alloc_conf(self, text: str) -> None:
        """Change ``PYTORCH_CUDA_ALLOC_CONF`` from now on (ValueError, one line, for a bad one).

        The cached segments that are wholly free go back, as a restart would
        give them back: new tensors then take segments made under the new
        setting, not the old cache (segments that hold a live tensor stay).
        """
        conf = parse_alloc_conf(text)
        with self._lock:
            self.alloc.conf = conf
            self.alloc.empty_cache()

    # -- life cycle -------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._mode is not None

    def start(self, scan: bool = True) -> None:
        """Begin tracking (idempotent; nested starts are counted).

        ``scan`` counts the tensors that already exist (found through the
        garbage collector), as the simulated GPU must.
        """
        self._users += 1
        if self._mode is not None:
            return
        if scan:
            self._scan_existing()
        self._mode = _TrackingMode(self)
        self._mode.__enter__()

    def stop(self) -> None:
        """Stop tracking once every :meth:`start` has been matched."""
        self._users = max(0, self._users - 1)
        if self._users or self._mode is None:
            return
        mode, self._mode = self._mode, None
        with contextlib.suppress(Exception):
            mode.__exit__(None, None, None)
        with self._lock:
            self._live.clear()
            self._ignored.clear()
            self.workspace, self.workspace_due = None, 0
            self.alloc = CachingAllocator(self.alloc.capacity, self.alloc.conf, caching=self.alloc.caching)

    def _scan_existing(self) -> None:
        # Tensors that existed before loading count too: find them once.
        tensor_type = torch.Tensor
        for obj in gc.get_objects():
            # type() rather than isinstance(): some module-level proxies warn
            # when their __class__ is looked up.
            if issubclass(type(obj), tensor_type):
                with contextlib.suppress(Exception):
                    self.register(obj)
        self.alloc.reset_peak()

    # -- accounting -------------------------------------------------------
    def _storage(self, tensor: torch.Tensor) -> Any:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None  # sparse, nested and other storage-less layouts
        if storage.device.type != self.track_device:
            return None  # on the simulated GPU, meta and fake tensors take no memory
        return storage

    def register(self, tensor: torch.Tensor, check: bool = False) -> int:
        """Count ``tensor``'s storage if it is new: one allocation from the allocator.

        Returns the bytes newly allocated, or, with ``check`` and a device that
        cannot hold the storage, minus the rounded bytes requested (and counts
        nothing).  Without ``check`` the allocation is made whatever the capacity.
        """
        storage = self._storage(tensor)
        if storage is None:
            return 0
        key = id(storage)
        nbytes = storage.nbytes()
        known = self._live.get(key)
        if known is not None:
            ref, requested, held = known
            if requested == nbytes:
                return 0
            # resize_ or an out= op changed the storage in place: a new allocation.
            with self._lock:
                before = self.alloc.allocated
                new = self._take(nbytes, check)
                if new is None:
                    return -self.alloc.round_size(nbytes)
                self._give(held)
                self._live[key] = (ref, nbytes, new)
                return self.alloc.allocated - before
        if key in self._ignored:
            return 0
        with self._lock:
            taken = self._take(nbytes, check)
            if taken is None:
                return -self.alloc.round_size(nbytes)
            self._live[key] = (weakref.ref(storage, self._release_callback(key)), nbytes, taken)
        return taken if isinstance(taken, int) else taken.size

    def take_workspace(self) -> None:
        """cuBLAS's workspace: allocated once, at the first matrix product, and kept (an OOM if it cannot be)."""
        nbytes, self.workspace_due = self.workspace_due, 0
        with self._lock:
            taken = self._take(nbytes, True)
        if taken is None:
            self.workspace_due = nbytes
            self.raise_oom(self.alloc.round_size(nbytes))
        self.workspace = taken

    def allocator_copy(self) -> tuple[CachingAllocator, dict[int, Block]]:
        """A copy of the allocator as it stands, and the copy of each live storage's block, by storage id.

        A dry run goes on from it: the notebook's other tensors keep their
        blocks, so the cell meets the same segments and the same fragmentation.
        """
        with self._lock:
            held = {key: entry[2] for key, entry in self._live.items() if isinstance(entry[2], Block)}
            kept = [*held.values(), *([self.workspace] if isinstance(self.workspace, Block) else [])]
            twin, copies = self.alloc.clone(kept)
        return twin, {key: copies[id(block)] for key, block in held.items()}

    def memory_snapshot(self) -> list[dict[str, Any]]:
        """The segments now, as ``torch.cuda.memory_snapshot()`` lists them.

        Without the cache every storage is its own exact segment.
        """
        with self._lock:
            held = [entry[2] for entry in self._live.values()]
            if self.workspace is not None:
                held.append(self.workspace)
            blocks = [h for h in held if isinstance(h, Block)]
            segments = self.alloc.snapshot(blocks)
            for index, size in enumerate(h for h in held if isinstance(h, int) and h):
                kind = "small" if size <= 1024 * 1024 else "large"
                block = {"size": size, "state": "active_allocated"}
                segments.append({"address": index, "total_size": size, "segment_type": kind, "blocks": [block]})
        return segments

    def replayed(self, conf: Any) -> tuple[CachingAllocator, dict[int, Block]]:
        """A new allocator with ``conf`` that has made the device's blocks again: what the device
        would hold had the notebook run from the start with that ``PYTORCH_CUDA_ALLOC_CONF``.

        The history is read from the layout: segment by segment in the order
        they were made, every block (live, and free ones as the tensors that
        were there) is allocated again in address order, then the free ones
        are freed, so live tensors keep the gaps that dead ones left between
        them.  Without the cache there is no layout: the live storages are
        allocated again in the order they came.  Blocks are returned by storage id.
        """
        with self._lock:
            twin = CachingAllocator(self.alloc.capacity, conf, caching=True)
            blocks: dict[int, Block] = {}
            held = {id(entry[2]): key for key, entry in self._live.items() if isinstance(entry[2], Block)}
            workspace = self.workspace
            if held or isinstance(workspace, Block):
                mine: list[Block] = [
                    block for block in (self._live[key][2] for key in held.values()) if isinstance(block, Block)
                ]
                if isinstance(workspace, Block):
                    mine.append(workspace)
                dead: list[Block] = []
                for first in self.alloc.segment_starts(mine):
                    block: Block | None = first
                    while block is not None:
                        if block.allocated:
                            again = twin.malloc(block.requested or block.size, force=True)
                            key = held.get(id(block))
                            if again is not None and key is not None:
                                blocks[key] = again
                        elif block.mapped:
                            again = twin.malloc(block.size, force=True)
                            if again is not None:
                                dead.append(again)
                        block = block.next
                for again in dead:
                    twin.free(again)
            else:
                if isinstance(workspace, int) and workspace:
                    twin.malloc(workspace, force=True)
                for key, (_ref, nbytes, _held) in self._live.items():
                    again = twin.malloc(nbytes, force=True) if nbytes else None
                    if again is not None:
                        blocks[key] = again
        twin.reset_peak()
        return twin, blocks

    def adopt(self, tensor: torch.Tensor, block: Block) -> None:
        """Count ``tensor``'s storage as holding ``block`` (already allocated in this allocator)."""
        storage = self._storage(tensor)
        if storage is None:
            return
        key = id(storage)
        with self._lock:
            if key not in self._live:
                self._live[key] = (weakref.ref(storage, self._release_callback(key)), storage.nbytes(), block)

    def _take(self, nbytes: int, check: bool) -> Block | int | None:
        """Allocate ``nbytes``: a Block from the caching model, or (no cache) just its rounded size.

        None where ``check`` is set and the device cannot hold it.  The no-cache
        path is inline: it runs for every new storage of every op.
        """
        alloc = self.alloc
        if alloc.caching:
            return alloc.malloc(nbytes, force=not check) if nbytes else 0
        if not nbytes:
            return 0
        size = -(-nbytes // 512) * 512 if not alloc.conf.roundup_power2_divisions else alloc.round_size(nbytes)
        if check and alloc.capacity is not None and alloc.reserved + size > alloc.capacity:
            alloc.num_ooms += 1
            return None
        alloc.allocated += size
        alloc.reserved += size
        if alloc.allocated > alloc.peak_allocated:
            alloc.peak_allocated = alloc.allocated
            if alloc.reserved > alloc.peak_reserved:
                alloc.peak_reserved = alloc.reserved
        return size

    def _give(self, held: Block | int) -> None:
        alloc = self.alloc
        if isinstance(held, int):
            alloc.allocated -= held
            alloc.reserved -= held
        else:
            alloc.free(held)

    def _release_callback(self, key: int) -> Any:
        def release(_ref: Any) -> None:
            with self._lock:
                entry = self._live.pop(key, None)
                if entry is not None:
                    self._give(entry[2])

        return release

    def _forget_callback(self, key: int) -> Any:
        def forget(_ref: Any) -> None:
            self._ignored.pop(key, None)

        return forget

    def ignore(self, out: Any) -> None:
        """Leave the storages in ``out`` uncounted for their whole life."""
        items = out if isinstance(out, (tuple, list)) else (out,)
        for item in items:
            if isinstance(item, torch.Tensor):
                storage = self._storage(item)
                if storage is None or id(storage) in self._live:
                    continue
                key = id(storage)
                self._ignored[key] = weakref.ref(storage, self._forget_callback(key))

    def live_storages(self) -> int:
        """How many storages are counted now."""
        return len(self._live)

    def reset_peak(self) -> None:
        self.alloc.reset_peak()

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: cached segments that are not split go back."""
        with self._lock:
            self.alloc.empty_cache()

    # -- OOM ----------------------------------------------------------------
    def check_request(self, nbytes: int) -> None:
        """Raise the OOM now if a storage of ``nbytes`` could not be allocated (a factory, before it runs)."""
        if self.alloc.capacity is None or nbytes <= 0:
            return
        with self._lock:
            block = self.alloc.malloc(nbytes)
            if block is None:
                self.raise_oom(self.alloc.round_size(nbytes))
            else:
                # Cached: the factory's own storage takes this block again.
                self.alloc.free(block)

    @staticmethod
    def guess_request(message: str) -> int:
        return parse_oom_message(message).requested_bytes or 0

    def oom_message(self, request: int) -> str:
        """CUDA's words (c10's OutOfMemoryError text), with the simulated device named."""
        capacity = self.capacity or 0
        in_use = self.reserved + self._context
        free = max(0, capacity - in_use)
        what = f"a {self.card.name}" if self.card else f"a {format_size_like_torch(capacity)} GPU"
        unallocated = self.reserved - self.allocated
        text = (
            f"CUDA out of memory. Tried to allocate {format_size_like_torch(request)}. "
            f"GPU 0 has a total capacity of {format_size_like_torch(capacity)} of which "
            f"{format_size_like_torch(free)} is free. Including non-PyTorch memory, this process has "
            f"{format_size_like_torch(in_use)} memory in use. Of the allocated memory "
            f"{format_size_like_torch(self.allocated)} is allocated by PyTorch, and "
            f"{format_size_like_torch(unallocated)} is reserved by PyTorch but unallocated."
        )
        if unallocated > 0 and unallocated >= request:
            text += (
                " If reserved but unallocated memory is large try setting "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
            )
        return text + f" (Simulated by oomnb: {what} on the CPU; no GPU memory was used.)"

    def raise_oom(self, request: int, from_host: bool = False) -> None:
        self.num_ooms += 1
        self.last_oom = (request, self.allocated, self.capacity or 0, self.reserved)
        message = self.oom_message(request)
        if from_host:
            message += " The host itself could not allocate this tensor."
        raise torch.OutOfMemoryError(message)

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Tensors made inside stay on the host: the device never counts them.

        For data sets and other things that on a real GPU would stay in CPU
        memory.
        """
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


#: The process-wide simulated device.
device = SimulatedDevice()
