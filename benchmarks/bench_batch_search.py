"""Largest batch that fits: oomnb's dry-run search against the tools people use, in one run.

On the simulated device with a fixed capacity, for three models (AdamW
training steps):

* oomnb: ``find_max_batch`` (dry runs on fake tensors), margin 0 and 5%;
* Hugging Face accelerate's ``find_executable_batch_size``, as its users run
  it: start high, catch the OOM, retry smaller;
* Lightning's ``Tuner.scale_batch_size(mode="binsearch")``;
* the true maximum: bisection over real steps, checked at max and max + 1.

Each row: batch found / true max, real OOMs triggered (counted by the
simulated device), wall time.  Targets for oomnb: >= 0.95 of the true max,
never above it, 0 real OOMs, <= 3 s.  Needs ``pip install accelerate lightning``
(``make bench`` installs them).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from oomnb.analysis.estimator import find_max_batch
from oomnb.backends.simulated import device as sim

MiB = 1024**2


def mlp() -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return net, lambda b: (torch.randn(b, 256), torch.randint(0, 10, (b,)))


def cnn() -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return net, lambda b: (torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,)))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(512, 128)
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.tok(idx)).mean(1))


def gpt() -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    return TinyGPT(), lambda b: (torch.randint(0, 512, (b, 64)), torch.randint(0, 10, (b,)))


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def real_fits(net: nn.Module, make: Callable[[int], Any], b: int, capacity: int) -> bool:
    """One real step at batch ``b`` on fresh copies, under ``capacity`` above what exists now."""
    model = copy.deepcopy(net)
    opt = torch.optim.AdamW(model.parameters())
    sim.capacity = sim.allocated + capacity
    try:
        step(model, opt, *make(b))
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        sim.capacity = None
        del model, opt


def true_max(net: nn.Module, make: Callable[[int], Any], capacity: int) -> tuple[int, float]:
    start = time.perf_counter()
    low, high = 0, 1
    while real_fits(net, make, high, capacity):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if real_fits(net, make, mid, capacity) else (low, mid)
    assert real_fits(net, make, low, capacity)
    assert not real_fits(net, make, low + 1, capacity)
    return low, time.perf_counter() - start


def with_oom_count(fn: Callable[[], int]) -> tuple[int, int, float]:
    before = sim.num_ooms
    start = time.perf_counter()
    found = fn()
    return found, sim.num_ooms - before, time.perf_counter() - start


def by_oomnb(net: nn.Module, make: Callable[[int], Any], capacity: int, margin: float) -> int:
    model = copy.deepcopy(net)
    opt = torch.optim.AdamW(model.parameters())
    return find_max_batch(step, model, opt, *make(8), capacity_bytes=capacity, margin=margin).max_batch


def by_accelerate(net: nn.Module, make: Callable[[int], Any], capacity: int, start_batch: int) -> int:
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=start_batch)
    def train(batch_size: int) -> int:
        if not real_fits(net, make, batch_size, capacity):
            raise torch.OutOfMemoryError(sim.oom_message(0))  # what the user's loop would raise
        return batch_size

    # real_fits catches the device's own OOM to clean up; count it as raised
    return int(train())


def by_lightning(net: nn.Module, make: Callable[[int], Any], capacity: int) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(net)
            self.batch_size = 2

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

        def train_dataloader(self) -> DataLoader:
            with sim.untracked():  # the data set lives on the host
                x, y = make(self.batch_size * 2)
            return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        module = Module()
        sim.capacity = sim.allocated + capacity
        try:
            found = Tuner(trainer).scale_batch_size(module, mode="binsearch", steps_per_trial=1, max_trials=30)
        finally:
            sim.capacity = None
    return int(found or 0)


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    sim.start()
    rows = []
    for name, build, capacity in (("MLP", mlp, 64 * MiB), ("CNN", cnn, 128 * MiB), ("GPT-like", gpt, 192 * MiB)):
        net, make = build()
        truth, seconds = true_max(net, make, capacity)
        print(f"{name}: capacity {capacity // MiB} MiB, true max batch {truth} ({seconds:.1f} s of real steps)")
        start_batch = 1 << (4 * truth).bit_length()
        methods: list[tuple[str, Callable[[], int]]] = [
            ("oomnb (dry runs, margin 0)", partial(by_oomnb, net, make, capacity, 0.0)),
            ("oomnb (dry runs, margin 5%)", partial(by_oomnb, net, make, capacity, 0.05)),
            (f"accelerate (start {start_batch})", partial(by_accelerate, net, make, capacity, start_batch)),
            ("lightning binsearch", partial(by_lightning, net, make, capacity)),
        ]
        for label, fn in methods:
            try:
                found, ooms, wall = with_oom_count(fn)
                rows.append((name, label, found, truth, ooms, wall))
            except Exception as exc:
                rows.append((name, label, -1, truth, -1, 0.0))
                print(f"  {label}: failed: {type(exc).__name__}: {str(exc)[:100]}")
    print(f"\n{'model':9} {'method':30} {'found':>6} {'true':>6} {'ratio':>6} {'real OOMs':>9} {'wall s':>7}")
    for name, label, found, truth, ooms, wall in rows:
        ratio = found / truth if truth and found >= 0 else float("nan")
        print(f"{name:9} {label:30} {found:6d} {truth:6d} {ratio:6.3f} {ooms:9d} {wall:7.2f}")
    print("targets for oomnb: ratio >= 0.95 and <= 1.0, 0 real OOMs, <= 3 s")
    sim.stop()


if __name__ == "__main__":
    main()
