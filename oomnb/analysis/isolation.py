"""Run a function where it cannot touch anything the user owns: a forked child.

Dry runs, what-ifs and probes execute the user's code (a cell, and the
functions it calls, which reach the notebook's globals).  Done in the kernel,
a dry run of ``train_step(bs)`` would train the real model; a probe would
overwrite the real checkpoint file.  So every such execution happens in a
child made by ``os.fork()``:

- the child has a copy-on-write image of the kernel: whatever it changes
  (the namespace, a model's weights, an optimizer's state, a counter) changes
  in the child only, and is gone when the child exits;
- every file descriptor it inherited (the log file the user opened, the
  kernel's sockets, stdout) is pointed at ``/dev/null`` before anything runs,
  so writes through them go nowhere;
- opening a file for writing gives an in-memory file, ``torch.save`` writes
  into memory, creating and removing files does nothing: a training step
  that logs and saves checkpoints still runs, and no file changes;
- an audit hook (:pep:`578`) refuses whatever gets past that (a file opened
  for writing by a reference bound earlier, removing, renaming, sockets,
  subprocesses, signals), so new effects cannot start;
- it runs under a time budget: past it the child is killed and the caller
  gets one line saying so, never a hang;
- it sends back plain data through a pipe and ends with ``os._exit`` (no
  ``atexit`` handlers, no buffered output flushed into the user's files).

What this cannot isolate: memory that is shared with other processes by
design (tensors in shared memory, ``MAP_SHARED`` file mappings) and work in
other processes the user started.  After a fork a CUDA context is unusable,
so a child must never touch CUDA: dry runs use fake tensors only, and real
probes run only on the simulated device.

Where ``fork`` does not exist (Windows), :func:`run_isolated` runs nothing and
says why; callers fall back to advice that needs no execution.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["CAN_ISOLATE", "Isolated", "IsolationRefused", "run_isolated"]

T = TypeVar("T")

#: Whether this platform can run code isolated (``os.fork`` exists).
CAN_ISOLATE = hasattr(os, "fork")

# Audit events that would reach outside the child.  Opening a file is
# checked by its mode; everything here is refused outright.
_REFUSED_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.rename",
        "os.replace",
        "os.truncate",
        "os.chmod",
        "os.chown",
        "os.link",
        "os.symlink",
        "os.mkdir",
        "os.mkfifo",
        "os.mknod",
        "os.utime",
        "os.chflags",
        "os.lchflags",
        "os.removexattr",
        "os.setxattr",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.kill",
        "os.killpg",
        "os.startfile",
        "signal.pthread_kill",
        "shutil.rmtree",
        "shutil.move",
        "shutil.copyfile",
        "shutil.copytree",
        "shutil.chown",
        "shutil.make_archive",
        "shutil.unpack_archive",
        "subprocess.Popen",
        "pty.spawn",
        "socket.__new__",
        "socket.bind",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "sqlite3.connect",
        "urllib.Request",
        "webbrowser.open",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class IsolationRefused(PermissionError):
    """An isolated child tried to reach outside itself (a file write, a socket, a process)."""


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        # ("open", path, mode, flags): io.open gives a mode string, os.open flags.
        if args and args[0] == os.devnull:
            return
        mode = args[1] if len(args) > 1 else None
        flags = args[2] if len(args) > 2 else 0
        writes = isinstance(mode, str) and any(c in mode for c in "wax+")
        if writes or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            raise IsolationRefused(f"writing {args[0]!r} is refused in a dry run")
        return
    if event == "mmap.__new__":
        # (fileno, length, access, offset): a shared writable map of a real file.
        fileno = args[0] if args else -1
        if isinstance(fileno, int) and fileno != -1 and len(args) > 2 and args[2] != 1:  # 1: ACCESS_READ
            raise IsolationRefused("a writable memory map of a file is refused in a dry run")
        return
    if event in _REFUSED_EVENTS:
        raise IsolationRefused(f"{event} is refused in a dry run")


def _silence_inherited_fds(keep: int) -> None:
    """Point every inherited descriptor but ``keep`` at /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc (macOS): the usual range
        fds = list(range(0, 1024))
    for fd in fds:
        if fd in (keep, null):
            continue
        with contextlib.suppress(OSError):
            os.dup2(null, fd)


def _redirect_writes() -> None:
    """Make the usual ways of writing files succeed without touching any file.

    A training function logs to a file and saves a checkpoint; refusing those
    would end its dry run.  So opening for writing gives an in-memory file,
    ``torch.save`` writes into memory, and creating or removing files and
    folders does nothing.  What is bound before this (``from os import
    remove``) or written from C code is stopped by the audit hook instead.
    """
    import builtins

    real_open = io.open

    def open_for_child(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return real_open(file, mode, *args, **kwargs)
        initial = b""
        if "+" in mode and "w" not in mode:
            with contextlib.suppress(OSError), real_open(file, "rb") as existing:
                initial = existing.read()
        if "b" in mode:
            buffer = io.BytesIO(initial)
            if "a" in mode:
                buffer.seek(0, io.SEEK_END)
            return buffer
        text = io.StringIO(initial.decode(kwargs.get("encoding") or "utf-8", errors="replace"))
        if "a" in mode:
            text.seek(0, io.SEEK_END)
        return text

    real_os_open = os.open

    def os_open_for_child(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & _WRITE_FLAGS:
            return real_os_open(os.devnull, os.O_RDWR)
        return real_os_open(path, flags, *args, **kwargs)

    def nothing(*_args: Any, **_kwargs: Any) -> None:
        return None

    builtins.open = open_for_child
    io.open = open_for_child
    os.open = os_open_for_child
    for name in (
        "mkdir",
        "makedirs",
        "remove",
        "unlink",
        "rename",
        "replace",
        "rmdir",
        "removedirs",
        "truncate",
        "mkfifo",  # no audit event for these two
        "mknod",
    ):
        setattr(os, name, nothing)
    serialization = sys.modules.get("torch.serialization")
    torch_module = sys.modules.get("torch")
    if torch_module is not None and serialization is not None:
        # Fake tensors cannot be pickled: saving does nothing in a dry run.
        setattr(torch_module, "save", nothing)  # noqa: B010
        setattr(serialization, "save", nothing)  # noqa: B010
    if serialization is not None and hasattr(serialization, "_open_zipfile_writer_buffer"):
        buffer_writer = serialization._open_zipfile_writer_buffer

        def zip_writer(name_or_buffer: Any, *args: Any, **kwargs: Any) -> Any:
            # torch.save(obj, "ckpt.pt") writes from C++: give it memory.
            return buffer_writer(io.BytesIO(), *args, **kwargs)

        setattr(serialization, "_open_zipfile_writer", zip_writer)  # noqa: B010
    if torch_module is not None:
        _redirect_torch_writers(torch_module, nothing)
    for module_name in ("safetensors.torch", "safetensors.numpy"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "serialize_file"):
            setattr(module, "serialize_file", nothing)  # noqa: B010 - written from Rust otherwise


def _redirect_torch_writers(torch_module: Any, nothing: Callable[..., None]) -> None:
    """torch's writers that reach the disk from C++, where no audit hook sees them."""
    real_writer = torch_module._C.PyTorchFileWriter

    def file_writer(target: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(target, (str, bytes, os.PathLike)):
            target = io.BytesIO()
        return real_writer(target, *args, **kwargs)

    setattr(torch_module._C, "PyTorchFileWriter", file_writer)  # noqa: B010
    jit = sys.modules.get("torch.jit")
    if jit is not None:
        setattr(jit, "save", nothing)  # noqa: B010 - ScriptModule.save writes from C++
        serialization = sys.modules.get("torch.jit._serialization")
        if serialization is not None:
            setattr(serialization, "save", nothing)  # noqa: B010
    real_from_file = torch_module.from_file

    def from_file(*args: Any, **kwargs: Any) -> Any:
        # A shared map would write through to the file.
        if len(args) > 1:
            args = (args[0], False, *args[2:])
        else:
            kwargs["shared"] = False
        return real_from_file(*args, **kwargs)

    setattr(torch_module, "from_file", from_file)  # noqa: B010


@dataclass
class Isolated(Generic[T]):
    """What an isolated run gave back: a value, or one line saying why not."""

    value: T | None
    error: str | None
    seconds: float
    #: The run was stopped by the time budget.
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _child(write_fd: int, fn: Callable[[], Any], prepare: Callable[[], None] | None) -> None:
    """Runs in the child; never returns."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _silence_inherited_fds(write_fd)
        sys.stdout = io.StringIO()
        sys.stderr = io.StringIO()
        torch_module = sys.modules.get("torch")
        if torch_module is not None:
            # The parent's OpenMP worker threads do not exist here, and GNU
            # OpenMP hangs when a forked child enters a parallel region: run
            # every kernel on this one thread.
            torch_module.set_num_threads(1)
        if prepare is not None:
            prepare()
        _redirect_writes()
        sys.addaudithook(_audit)
        try:
            payload: tuple[str, Any] = ("ok", fn())
        except BaseException as exc:
            payload = ("error", _one_line(exc))
        try:
            data = pickle.dumps(payload)
        except Exception as exc:
            data = pickle.dumps(("error", f"the result could not be sent back: {_one_line(exc)}"))
        view = memoryview(data)
        while view:
            written = os.write(write_fd, view)
            view = view[written:]
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def run_isolated(
    fn: Callable[[], T],
    *,
    budget_s: float,
    prepare: Callable[[], None] | None = None,
) -> Isolated[T]:
    """Call ``fn()`` in a forked child and return its (picklable) result.

    Parameters
    ----------
    fn
        What to run.  It sees the process as it is now; nothing it changes
        reaches this process.  Its result must be picklable plain data.
    budget_s
        Seconds the child may run; then it is killed and the result says so.
    prepare
        Called first in the child (after its descriptors are silenced, before
        the audit hook): for the caller to cut the child off from what it
        knows of (a kernel's display channels).

    Returns
    -------
    Isolated
        ``value`` on success; otherwise ``error``, one line.  Never raises
        (but re-raises ``KeyboardInterrupt`` after killing the child).
    """
    started = time.perf_counter()
    if not CAN_ISOLATE:
        return Isolated(None, "this platform has no fork(): nothing is run for advice", 0.0)
    if budget_s <= 0:
        return Isolated(None, "no time left in the advice budget", 0.0, timed_out=True)
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns that fork in a threaded process may deadlock the
        # child: the child here takes no lock the kernel's threads hold
        # (no logging, no output channel), and the budget ends it regardless.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(read_fd)
        _child(write_fd, fn, prepare)
    os.close(write_fd)
    chunks: list[bytes] = []
    timed_out = False
    try:
        deadline = started + budget_s
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        _kill(pid)
        raise
    finally:
        os.close(read_fd)
    if timed_out:
        _kill(pid)
        return Isolated(None, f"stopped after {budget_s:g} s (the time budget)", time.perf_counter() - started, True)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    if not chunks:
        if os.WIFSIGNALED(status):
            return Isolated(None, f"the isolated run died ({signal.Signals(os.WTERMSIG(status)).name})", seconds)
        return Isolated(None, "the isolated run ended without a result", seconds)
    try:
        kind, value = pickle.loads(b"".join(chunks))  # noqa: S301 - our own child's bytes
    except Exception as exc:
        return Isolated(None, f"the isolated run's result was unreadable: {_one_line(exc)}", seconds)
    if kind == "error":
        return Isolated(None, str(value), seconds)
    return Isolated(value, None, seconds)


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.waitpid(pid, 0)
