"""Dry runs of CUDA cells without CUDA: every ``cuda`` device read as the host's.

A dry run happens in a child forked from the kernel.  Where the kernel has
started CUDA, the child cannot use it: any CUDA call there fails ("Cannot
re-initialize CUDA in forked subprocess", or the driver's "initialization
error").  Fake tensors on the ``cuda`` device make such calls themselves
(``FakeTensor`` creates a real one-element CUDA tensor first; autograd's
engine sets the CUDA device for a backward on them).

So in the child, while :func:`cuda_as_host` is active:

- the fake copy of a real CUDA tensor is a fake tensor on the CPU with the
  same shape, strides and dtype, built from metadata only (no CUDA call);
- ``device="cuda"`` (any index) in factories, ``Tensor.to``, ``Tensor.cuda``,
  ``Module.to`` and ``Module.cuda`` means the CPU, and ``torch.autocast``
  for ``cuda`` autocasts the CPU;
- ``torch.cuda``'s synchronisation and statistics calls do nothing (they
  return 0), since a cell's logging must not end its dry run.

Every storage a fake tensor gets counts as device memory in a dry run (see
:mod:`oomnb.analysis.estimator`), so what the cell would allocate on the
card is still counted.  A tensor copied from the notebook's host memory and
moved to the device (``x.cuda()``) is copied here too, as it would be.

Only for the forked child: it patches ``torch`` for the child's lifetime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["cuda_as_host", "fake_from_cuda", "host_tensor_ids", "in_forked_cuda_child"]

#: ids of the fake copies of tensors that lived in host memory in the notebook:
#: moving one of them to the device allocates there.
host_tensor_ids: set[int] = set()


#: Read CUDA as the host even where CUDA could be used (tests, on machines without it).
force = False


def in_forked_cuda_child() -> bool:
    """Whether this process was forked from one that had started CUDA (or :data:`force` is set)."""
    return force or bool(torch.cuda._is_in_bad_fork())


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    # An int device means a CUDA index; bools are not devices.
    return isinstance(device, int) and not isinstance(device, bool)


def _host(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda(device) else device


def fake_from_cuda(mode: Any, tensor: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor with ``tensor``'s shape, strides, dtype and ``requires_grad``.

    Built from metadata alone: nothing here calls CUDA.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    meta = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype, device="meta")
    fake = FakeTensor(mode, meta, torch.device("cpu"))
    if tensor.requires_grad and tensor.is_leaf:
        fake.requires_grad_(True)
    return fake


class _CudaAsHost(TorchFunctionMode):
    """Reads every CUDA device in a call as the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        original = kwargs or {}
        kwargs = dict(original)
        if "device" in kwargs:
            kwargs["device"] = _host(kwargs["device"])
        if func is torch.Tensor.cuda:
            source = args[0]
            moved = source.clone() if id(source) in host_tensor_ids else source
            return moved.to("cpu", **{k: v for k, v in kwargs.items() if k == "non_blocking"})
        if func is torch.Tensor.to:
            source, rest = args[0], args[1:]
            moving = any(_is_cuda(a) for a in rest) or _is_cuda(original.get("device"))
            to: Any = func
            result = to(source, *(torch.device("cpu") if _is_cuda(a) else a for a in rest), **kwargs)
            if moving and result is source and id(source) in host_tensor_ids:
                return result.clone()
            return result
        return func(*args, **kwargs)


class _AutocastOnHost(torch.autocast):
    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


_QUIET = ("synchronize", "empty_cache", "reset_peak_memory_stats", "reset_max_memory_allocated", "ipc_collect")
_ZERO = ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved")


@contextlib.contextmanager
def cuda_as_host() -> Iterator[None]:
    """Within it, CUDA is read as the host (see the module's text); for a forked child only."""
    from torch._subclasses import fake_tensor

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def module_to(original: Any) -> Any:
        def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            args = tuple(_host(a) if _is_cuda(a) else a for a in args)
            if "device" in kwargs:
                kwargs["device"] = _host(kwargs["device"])
            return original(self, *args, **kwargs)

        return to

    try:
        patch(fake_tensor, "init_gpu_context", lambda device: None)
        patch(torch, "autocast", _AutocastOnHost)
        patch(torch.amp, "autocast", _AutocastOnHost)
        patch(torch.nn.Module, "to", module_to(torch.nn.Module.to))
        patch(torch.nn.Module, "cuda", lambda self, device=None: self)
        for name in _QUIET:
            if hasattr(torch.cuda, name):
                patch(torch.cuda, name, lambda *a, **k: None)
        for name in _ZERO:
            if hasattr(torch.cuda, name):
                patch(torch.cuda, name, lambda *a, **k: 0)
        with _CudaAsHost():
            yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


class FakeCopyFromCuda:
    """A ``FakeCopyMode`` whose copies of CUDA tensors are fake CPU tensors, made without CUDA.

    The copies of host tensors are remembered in :data:`host_tensor_ids`.
    """

    def __new__(cls, mode: Any) -> Any:
        from torch._subclasses.fake_tensor import FakeCopyMode

        class _Copy(FakeCopyMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if func is torch._C.TensorBase.clone or func is torch.Tensor.__deepcopy__:
                    tensor = args[0]
                    if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                        memo = args[1] if func is torch.Tensor.__deepcopy__ else None
                        if memo is not None and id(tensor) in memo:
                            return memo[id(tensor)]
                        fake = fake_from_cuda(self.fake_mode, tensor)
                        if memo is not None:
                            memo[id(tensor)] = fake
                        return fake
                out = super().__torch_function__(func, types, args, kwargs)
                if isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" and isinstance(out, torch.Tensor):
                    host_tensor_ids.add(id(out))
                return out

        return _Copy(mode)
