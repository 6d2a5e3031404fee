"""Overhead of oomnb's measurement, side by side in one run.

1. The simulated device on a CPU training loop (an MLP and a small CNN, 30
   steps each): time with tracking / time without.  Target <= 1.15.
2. ``%%gpumem`` around an empty cell, per backend: milliseconds added per
   cell.  Targets <= 2 ms simulated, <= 0.5 ms CUDA (where a GPU is present).

Runs alternate (A B A B ...) so that a noisy neighbour hits both sides; the
median of the rounds is printed.  Nothing here is a test: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from oomnb.backends.simulated import SimulatedDevice


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    return model, torch.randn(256, 1024), torch.randint(0, 10, (256,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 10),
    )
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def train_loop(build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]], steps: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model, x, y = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

    run()  # warm-up: optimizer state, allocator, caches
    return run


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class NullMode(TorchDispatchMode):
    """A dispatch mode that does nothing: the floor any per-op tracker pays."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def bench_tracking(rounds: int, steps: int) -> list[tuple[str, float, float, float, float]]:
    rows = []
    for name, build in (("MLP 1024-2048-2048-10, batch 256", mlp), ("CNN 2 conv + BN, batch 64x3x32x32", cnn)):
        run = train_loop(build, steps)
        exact, caching = SimulatedDevice(), SimulatedDevice()
        exact.caching, caching.caching = False, True
        plain, null, tracked, cached = [], [], [], []
        for _ in range(rounds):
            plain.append(timed(run))
            with NullMode():
                null.append(timed(run))
            for device, times in ((exact, tracked), (caching, cached)):
                device.start()
                try:
                    times.append(timed(run))
                finally:
                    device.stop()
        rows.append(
            (
                name,
                statistics.median(plain),
                statistics.median(null),
                statistics.median(tracked),
                statistics.median(cached),
            )
        )
    return rows


# A namespace like a training notebook's: what the ledger taken before each
# measured cell (weak references, gradients, optimizer state) has to record.
NOTEBOOK = """
import torch
from torch import nn
model = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), num_layers=12)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 8, 64)).sum().backward()
opt.step()
losses = [torch.randn(()) for _ in range(1000)]
history = {f"epoch{i}": {"loss": float(i), "acc": 0.5} for i in range(200)}
batch = {"x": torch.randn(8, 64), "y": torch.randint(0, 10, (8,))}
"""


def bench_magic(cells: int, device: str, setup: str = "") -> tuple[float, float, float]:
    """Median ms per empty cell: plain, with %%gpumem --quiet, and with the report displayed."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.reset(new_session=False)
    ip.run_line_magic("load_ext", "oomnb")
    if setup:
        ip.run_cell(setup)
    sink = io.StringIO()

    def per_cell(code: str) -> float:
        with contextlib.redirect_stdout(sink):
            start = time.perf_counter()
            for _ in range(cells):
                ip.run_cell(code)
            return (time.perf_counter() - start) / cells * 1e3

    per_cell("pass")
    per_cell(f"%%gpumem --quiet --device {device}\npass")
    plain, quiet, shown = [], [], []
    for _ in range(5):
        plain.append(per_cell("pass"))
        quiet.append(per_cell(f"%%gpumem --quiet --device {device}\npass"))
        shown.append(per_cell(f"%%gpumem --device {device}\npass"))
    ip.run_line_magic("unload_ext", "oomnb")
    return statistics.median(plain), statistics.median(quiet), statistics.median(shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cells", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
    print(
        f"\n1. Simulated-device tracking on a CPU training loop ({args.steps} steps of forward, backward, AdamW step)"
    )
    print(
        f"   {'workload':38} {'plain s':>9} {'empty mode s':>13} {'exact s':>9} {'caching s':>10} {'floor':>7}"
        f" {'exact':>7} {'caching':>8}"
        "   (ratios to plain, target <= 1.15; floor = an empty dispatch mode; exact = reserved equals allocated,"
        " caching = the caching allocator model)"
    )
    for name, plain, null, tracked, cached in bench_tracking(args.rounds, args.steps):
        print(
            f"   {name:38} {plain:9.3f} {null:13.3f} {tracked:9.3f} {cached:10.3f} {null / plain:7.3f}"
            f" {tracked / plain:7.3f} {cached / plain:8.3f}"
        )

    print(f"\n2. %%gpumem around an empty cell ({args.cells} cells a round)")
    devices = ["simulated"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for label, setup in (("empty notebook", ""), ("training notebook", NOTEBOOK)):
            plain, quiet, shown = bench_magic(args.cells, device, setup)
            print(
                f"   {device:10} {label:18} plain cell {plain:.3f} ms · with %%gpumem --quiet {quiet:.3f} ms "
                f"(+{quiet - plain:.3f} ms) · with the report displayed {shown:.3f} ms (+{shown - plain:.3f} ms)"
                " · target <= 1 ms added"
            )
    print(
        "   (training notebook: a 12-layer encoder with AdamW state, 1000 loss tensors, nested dicts; the"
        " ledger taken before each cell records them)"
    )
    if not torch.cuda.is_available():
        print("   cuda       no CUDA device here: not measured")


if __name__ == "__main__":
    main()
