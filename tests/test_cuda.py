"""The CUDA backend against torch's own allocator figures (needs a GPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import oomnb
from oomnb.backends import get_backend
from oomnb.model.units import round_allocation

pytestmark = pytest.mark.gpu
MiB = 1024**2


def test_loading_does_not_initialise_cuda() -> None:
    # Runs first in its own process in CI on a GPU machine; here we only check
    # that building the backend and reading it leaves CUDA alone.
    if torch.cuda.is_initialized():
        pytest.skip("CUDA was initialised by an earlier test in this process")
    backend = get_backend("cuda")
    backend.snapshot()
    assert not torch.cuda.is_initialized()


def test_snapshot_matches_torch() -> None:
    backend = get_backend("cuda:0")
    x = torch.empty(1024, device="cuda")
    snap = backend.snapshot()
    assert snap.allocated_bytes == torch.cuda.memory_allocated(0)
    assert snap.reserved_bytes == torch.cuda.memory_reserved(0)
    assert snap.capacity_bytes == torch.cuda.mem_get_info(0)[1]
    del x


@pytest.mark.parametrize("numel", [1, 10, 1024, 1000 * 1000, 3 * 1024 * 1024])
def test_simulated_rounding_equals_cuda_allocator(numel: int) -> None:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    t = torch.empty(numel, device="cuda")
    assert torch.cuda.memory_allocated(0) - before == round_allocation(numel * 4)
    del t


def test_cell_magic_on_cuda_catches_a_real_oom(shell: Any) -> None:
    shell.run("import torch")
    result = shell.run(
        "%%gpumem --device cuda --limit 1GiB\nx = torch.empty(2 * 1024**3, dtype=torch.uint8, device='cuda')"
    )
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert report.device.kind == "cuda"
    assert report.oom.requested_bytes == 2 * 1024**3
    assert report.end_bytes == report.baseline_bytes


def test_peak_matches_max_memory_allocated(shell: Any) -> None:
    shell.run("import torch")
    shell.run("%%gpumem --device cuda\na = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device='cuda')\ndel a")
    report = oomnb.last_report()
    assert report is not None
    assert report.peak_bytes - report.baseline_bytes == 64 * MiB


def test_dry_run_within_10_percent_of_cuda_peak() -> None:
    """The dry run (fake CPU tensors, CUDA accounting) against the real CUDA peak."""
    import copy

    from oomnb.analysis.estimator import dry_run

    from .models import workloads

    for name, (model, step, inputs) in workloads().items():
        if name == "lstm":
            continue  # cuDNN's LSTM keeps a reserve space the CPU path does not have
        real_model = copy.deepcopy(model).cuda()
        opt = torch.optim.AdamW(real_model.parameters(), lr=1e-3)
        real_inputs = tuple(t.cuda() for t in inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step(real_model, opt, *real_inputs)
        torch.cuda.synchronize()
        real = torch.cuda.max_memory_allocated() - start
        fake_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = dry_run(step, model, fake_opt, *inputs)
        dry = run.peak_bytes - run.start_bytes
        assert abs(dry - real) <= 0.10 * real, (name, dry, real)
        del real_model, opt, real_inputs
        torch.cuda.empty_cache()


def test_advice_after_a_cuda_oom_runs_isolated_and_leaves_cuda_usable(shell: Any) -> None:
    """The advice child is forked from a process with a CUDA context: it must use fake tensors only,
    never the context, and the kernel's CUDA must work afterwards."""
    shell.run(
        "import torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).cuda()\n"
        "opt = torch.optim.AdamW(model.parameters())\nbatch_size = 65536"
    )
    weights = [p.detach().clone() for p in shell.ns["model"].parameters()]
    baseline = torch.cuda.memory_allocated()
    result = shell.run(
        f"%%gpumem --device cuda --limit {baseline + 512 * MiB} --batch-var batch_size\n"
        "loss = model(torch.randn(batch_size, 1024, device='cuda')).pow(2).mean()\n"
        "loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)"
    )
    assert result.success
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    assert any(s.source == "dry-run" for s in report.suggestions), report.notes
    assert torch.cuda.memory_allocated() <= baseline
    assert all(torch.equal(a, b) for a, b in zip(weights, shell.ns["model"].parameters(), strict=True))
    assert (torch.ones(4, device="cuda") * 2).sum().item() == 8  # the parent's context still works


# -- the caching allocator model against the real allocator ---------------------------------
_SEQUENCE_CHILD = r"""
import json, sys, torch
MiB = 2**20
cap = sys.argv[2]
torch.cuda.init()
if cap != "None":
    total = torch.cuda.get_device_properties(0).total_memory
    # A little over, so the fraction's float rounding never lands below the figure.
    torch.cuda.set_per_process_memory_fraction((int(cap) * MiB + 4096) / total)
live, failed = {}, [False]
def A(n):
    try:
        t = torch.empty(n, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError:
        failed[0] = True
        return None
    key = len(live) + 1
    while key in live:
        key += 1
    live[key] = t
    return key
def F(key):
    live.pop(key, None)
def E():
    torch.cuda.empty_cache()
exec(sys.argv[1])
s = torch.cuda.memory_stats()
print(json.dumps([s["allocated_bytes.all.current"], s["reserved_bytes.all.current"],
                  s["reserved_bytes.all.peak"], failed[0]]))
"""

SEQUENCES = {
    "mixed": "h = [A(1000), A(MiB), A(MiB + 1), A(12 * MiB), A(30 * MiB)]",
    "split_merge": "x = A(3 * MiB); y = A(4 * MiB); z = A(13 * MiB - 512 * 1024); F(y); F(x); F(z)",
    "fragment": "t = [(A(7 * MiB), A(6 * MiB), A(7 * MiB)) for _ in range(10)]\n"
    "for a, b, c in t: F(a); F(c)\nq = A(10 * MiB)",
    "max_split": "x = A(40 * MiB); F(x); y = A(8 * MiB); q = A(40 * MiB)",
    "empty_cache": "b = [A(12 * MiB) for _ in range(3)]; F(b[0]); F(b[1]); E()",
    "release_first": "F(A(12 * MiB)); q = A(24 * MiB)",
    "gc": "o = [A(12 * MiB) for _ in range(4)]\nfor b in o: F(b)\nA(14 * MiB); A(16 * MiB)",
}


@pytest.mark.parametrize(
    ("name", "conf", "capacity_mib"),
    [
        ("mixed", "", None),
        ("split_merge", "", None),
        ("fragment", "", 200),
        ("fragment", "expandable_segments:True", 200),
        ("max_split", "", 70),
        ("max_split", "max_split_size_mb:32", 70),
        ("empty_cache", "", None),
        ("release_first", "", 30),
        ("gc", "garbage_collection_threshold:0.5", 100),
    ],
)
def test_allocator_model_matches_the_card(name: str, conf: str, capacity_mib: int | None) -> None:
    """Allocated, reserved, peak reserved and the OOM of a sequence: the model's are the card's, exactly."""
    import json
    import os
    import subprocess
    import sys

    from oomnb.allocator.caching import CachingAllocator, parse_alloc_conf

    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf)
    out = subprocess.run(
        [sys.executable, "-c", _SEQUENCE_CHILD, SEQUENCES[name], str(capacity_mib)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    real = json.loads(out.stdout.strip().splitlines()[-1])
    model = CachingAllocator(None if capacity_mib is None else capacity_mib * MiB, parse_alloc_conf(conf))
    failed = [False]

    def allocate(n: int) -> Any:
        block = model.malloc(n)
        failed[0] = failed[0] or block is None
        return block

    def free(block: Any) -> None:
        if block is not None:
            model.free(block)

    exec(SEQUENCES[name], {"A": allocate, "F": free, "E": model.empty_cache, "MiB": MiB})
    assert [model.allocated, model.reserved, model.peak_reserved, failed[0]] == real
