"""OOM scenarios: the right change ranks first, and applying it makes the cell fit."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

import oomnb
from oomnb.model.report import MIME_TYPE, load_schema

MiB = 1024**2


#: Capacities of tens of MiB, tuned with allocations counted exactly: with the
#: cache modelled a 20 MiB segment is most of such a card and other advice
#: wins (``tests/test_fragmentation.py`` covers the cache's own advice).
EXACT_SCALE = pytest.mark.usefixtures("exact_allocator")

SETUP = """
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
"""
TRAIN = """
x = torch.randn(batch_size, 256)
loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (batch_size,)))
loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
"""


def oom_report(shell: Any, cell: str, limit: int, batch_var: str | None = "batch_size") -> Any:
    option = f" --batch-var {batch_var}" if batch_var else ""
    result = shell.run(f"%%gpumem --limit {limit}{option}\n{cell}")
    assert result.success
    report = oomnb.last_report()
    assert report is not None
    assert report.oom is not None, "the scenario must run out of memory"
    jsonschema.validate(report.to_dict(), load_schema())
    assert MIME_TYPE in result.captured.outputs[-1].data
    return report


def fits(shell: Any, cell: str, limit: int) -> bool:
    shell.run(f"%%gpumem --limit {limit} --quiet\n{cell}")
    report = oomnb.last_report()
    return report is not None and report.oom is None


@EXACT_SCALE
def test_batch_too_large(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 4096")
    limit = shell.allocated() + 12 * MiB
    baseline = shell.allocated()
    report = oom_report(shell, TRAIN, limit)
    assert shell.allocated() <= baseline
    # Same math first: the cell rewritten as micro-batches with one step,
    # measured as such; pasted as written, it fits and keeps the batch of 4096.
    top = report.suggestions[0]
    assert top.kind == "gradient_accumulation" and top.fits is True and top.source == "dry-run"
    steps, micro = top.params["accumulation_steps"], top.params["value"]
    assert steps * micro >= 4096 and (steps - 1) * micro < 4096
    assert top.code.startswith(f"accumulation_steps = {steps}\nbatch_size = {micro}\nfor micro_step in range(")
    assert "(loss / accumulation_steps).backward()" in top.code
    assert fits(shell, top.code, limit)
    # a smaller batch alone changes the experiment: after it, and it fits too
    smaller = next(s for s in report.suggestions if s.kind == "batch_size")
    assert smaller.fits is True and 0 < smaller.params["value"] < 4096
    assert smaller.params["accumulation_steps"] == -(-4096 // smaller.params["value"])
    shell.run(f"batch_size = {smaller.params['value']}")
    assert fits(shell, TRAIN, limit)
    # the answer keeps the 5% margin, and the dry run predicted the real peak
    real = oomnb.last_report()
    assert real is not None
    assert real.peak_bytes <= 0.95 * limit


def test_losses_list_keeping_graphs(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 256\nlosses = []")
    for _ in range(6):  # the classic leak: the loss is kept with its graph, backward never called
        shell.run("losses.append(nn.functional.cross_entropy(model(torch.randn(512, 256)), torch.zeros(512).long()))")
    limit = shell.allocated() + 2 * MiB
    report = oom_report(shell, TRAIN, limit)
    top = report.suggestions[0]
    assert top.kind == "free_references"
    assert top.params["names"] == ["losses"]
    assert "6 autograd graphs" in top.title
    assert top.source == "measured"
    shell.run("losses = [l.detach() for l in losses]")
    assert fits(shell, TRAIN, limit)


def test_output_cache_holding_a_tensor(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 256")
    shell.run(f"torch.ones({4 * MiB})")  # 16 MiB kept by Out[n] and _
    limit = shell.allocated() - 8 * MiB
    report = oom_report(shell, TRAIN, limit)
    top = report.suggestions[0]
    assert top.kind == "clear_output_cache"
    assert top.saves_bytes == 16 * MiB and top.fits is True
    shell.run(top.code)  # applied literally, as a user would paste it
    assert fits(shell, TRAIN, limit)


def test_traceback_holding_memory(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 256")
    shell.run(f"def load():\n    big = torch.ones({4 * MiB})\n    raise ValueError('bad file')\nload()")
    limit = shell.allocated() - 8 * MiB
    report = oom_report(shell, TRAIN, limit)
    # the OOM recovery itself clears the last traceback: what is left to do is rerun
    assert report.recovered_bytes >= 16 * MiB
    top = report.suggestions[0]
    assert top.title == "The memory is free now: run the cell again"
    assert top.saves_bytes == 16 * MiB and top.fits is True
    assert "ValueError in load()" in top.detail
    assert any("held by the last error's traceback (ValueError in load())" in n for n in report.notes)
    assert fits(shell, top.code, limit)


def test_eval_without_no_grad(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 4096")
    evaluate = "out = model(torch.randn(batch_size, 256)).relu().sum(0)"
    limit = shell.allocated() + 24 * MiB
    report = oom_report(shell, evaluate, limit)
    kinds = [s.kind for s in report.suggestions]
    assert kinds[0] == "no_grad", kinds
    assert fits(shell, "with torch.no_grad():\n    " + evaluate, limit)


def test_weights_and_state_over_capacity(shell: Any) -> None:
    shell.run(
        "from torch import nn\n"
        "model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])\n"  # 16 MiB of weights
        "opt = torch.optim.Adam(model.parameters())\nbatch_size = 8"
    )
    cell = "model(torch.randn(batch_size, 1024)).sum().backward(); opt.step()"
    limit = shell.allocated() + 20 * MiB  # weights fit; gradients and Adam's two moments do not
    report = oom_report(shell, cell, limit)
    kinds = [s.kind for s in report.suggestions]
    assert {"sharding", "optimizer", "quantization"} <= set(kinds), report.notes
    # the weights, not the batch, are the problem: a weights change ranks first
    assert kinds[0] in {"sharding", "optimizer", "quantization"}
    assert "batch_size" not in kinds or kinds.index("batch_size") > kinds.index("sharding")
    sharding = next(s for s in report.suggestions if s.kind == "sharding")
    assert sharding.params["gpus"] >= 2


@EXACT_SCALE
def test_dry_run_flag_runs_nothing(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 1024")
    before = shell.allocated()
    shell.ns.pop("x", None)
    result = shell.run(f"%%gpumem --dry-run --limit {before + 4 * MiB} --batch-var batch_size\n{TRAIN}")
    report = oomnb.last_report()
    assert result.success
    assert report is not None and report.dry_run
    assert "x" not in shell.ns  # not executed
    assert shell.allocated() == before
    assert report.peak_bytes > before + 4 * MiB  # it would not fit...
    assert report.suggestions[0].kind == "gradient_accumulation"  # ...and the advisor says what would
    assert "DRY RUN" in result.captured.outputs[-1].data["text/plain"]


def test_advise_line_magic(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 64")
    shell.run(f"%%gpumem --batch-var batch_size --limit {shell.allocated() + 64 * MiB}\n{TRAIN}")
    shown = shell.run("%gpumem advise")
    assert shown.success
    assert MIME_TYPE in shown.captured.outputs[-1].data
    bad = shell.run("%gpumem advise")
    assert bad.success


@EXACT_SCALE
def test_cell_that_cannot_be_dry_run_gets_two_real_probes(shell: Any) -> None:
    shell.run(SETUP + "batch_size = 4096")
    masked = (
        "x = torch.randn(batch_size, 256)\n"
        "out = model(x)\n"
        "loss = out[out > 0].sum()  # the shape depends on the values: no dry run\n"
        "loss.backward(); opt.zero_grad(set_to_none=True)"
    )
    limit = shell.allocated() + 12 * MiB
    baseline = shell.allocated()
    report = oom_report(shell, masked, limit)
    assert any("dry run not possible: the step reads tensor values" in note for note in report.notes), report.notes
    top = report.suggestions[0]
    assert top.kind == "batch_size"
    assert top.source == "measured"
    assert "Two real probes (batch_size=512 and 1024, on copies)" in top.detail
    assert shell.allocated() <= baseline  # the probes' copies are gone
    shell.run(f"batch_size = {top.params['value']}")
    assert fits(shell, masked, limit)


def test_sequence_length_is_an_input_size(shell: Any) -> None:
    shell.run(SETUP + "seq_len = 4096")
    cell = "h = model(torch.randn(seq_len, 256))\nh.sum().backward(); opt.zero_grad(set_to_none=True)"
    limit = shell.allocated() + 12 * MiB
    shell.run(f"%%gpumem --limit {limit} --batch-var seq_len\n{cell}")
    report = oomnb.last_report()
    assert report is not None and report.oom is not None
    top = report.suggestions[0]
    assert top.kind == "input_size"
    assert top.params["variable"] == "seq_len"
    assert all(s.kind != "gradient_accumulation" for s in report.suggestions)
    shell.run(f"seq_len = {top.params['value']}")
    assert fits(shell, cell, limit)


def test_batch_size_set_in_the_cell_is_searched_and_the_edited_cell_fits(shell: Any) -> None:
    """The most common notebook pattern: `bs = 8192` on the cell's first line."""
    shell.run(
        "from torch import nn\nmodel = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)"
    )
    cell = (
        "bs = 8192\nx = torch.randn(bs, 256)\nloss = model(x).pow(2).mean()\nloss.backward()\n"
        "opt.step(); opt.zero_grad(set_to_none=True)"
    )
    limit = shell.allocated() + 32 * MiB
    report = oom_report(shell, cell, limit, batch_var="bs")
    top = next(s for s in report.suggestions if s.kind == "batch_size")
    assert top.source == "dry-run" and top.fits is True
    assert top.params["cell_line"] == 1
    value = top.params["value"]
    assert 1024 < value < 8192
    # the snippet is the cell itself with its first line edited: pasted as is, it fits
    assert top.code.splitlines()[0] == f"bs = {value}"
    assert top.code.splitlines()[1:] == cell.splitlines()[1:]
    assert fits(shell, top.code, limit)
    # accumulation ranks first and edits the cell's own assignment
    first = report.suggestions[0]
    assert first.kind == "gradient_accumulation"
    assert f"    bs = {first.params['value']}" in first.code.splitlines()
    assert fits(shell, first.code, limit)


@EXACT_SCALE
def test_mixed_precision_snippet_runs_where_the_cell_ran(shell: Any) -> None:
    """The autocast device is the cell's own ("cpu" on the simulated device) and the snippet is the cell."""
    shell.run(
        "from torch import nn\nmodel = nn.Sequential(*[nn.Sequential(nn.Linear(512, 2048), nn.GELU(), "
        "nn.Linear(2048, 512)) for _ in range(4)])\nx = torch.randn(512, 512)"
    )
    cell = "out = model(x)\nprint(out.shape)"
    limit = shell.allocated() + 12 * MiB
    report = oom_report(shell, cell, limit, batch_var=None)
    by_kind = {s.kind: s for s in report.suggestions}
    mixed = by_kind["mixed_precision"]
    assert mixed.code.splitlines()[0] == 'with torch.autocast("cpu", dtype=torch.bfloat16):'
    assert mixed.code.splitlines()[1:] == ["    out = model(x)", "    print(out.shape)"]
    no_grad = by_kind["no_grad"]
    assert no_grad.fits is True and report.suggestions[0] is no_grad
    assert fits(shell, no_grad.code, limit)
    # what the dry run says of autocast alone is what happens when it is pasted
    assert mixed.fits is False and not fits(shell, mixed.code, limit)
    # a suggestion that does not fit never ranks above one that does
    order = [s.fits for s in report.suggestions]
    assert order == sorted(order, key=lambda f: 0 if f else (1 if f is None else 2))


def test_graph_on_an_object_attribute_gets_a_valid_snippet(shell: Any) -> None:
    """`net = net.detach()` was suggested for a graph kept on an attribute: modules have no detach()."""
    shell.run(
        SETUP + "batch_size = 256\nclass Trainer:\n    pass\ntrainer = Trainer()\n"
        "trainer.last_loss = model(torch.randn(4096, 256)).sum()"  # keeps its graph
    )
    limit = shell.allocated() + 2 * MiB
    report = oom_report(shell, TRAIN, limit)
    leak = next(s for s in report.suggestions if s.params.get("action") == "detach")
    assert leak.params["path"] == "trainer.last_loss"
    assert leak.code.splitlines()[0] == "trainer.last_loss = trainer.last_loss.detach()"
    shell.run(leak.code)  # applied literally
    assert shell.ns["trainer"].last_loss.grad_fn is None
    assert fits(shell, TRAIN, limit)


BLOCKS = """
from torch import nn
torch.manual_seed(0)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)) for _ in range(8)]
        )
        self.head = nn.Linear(512, 10)
    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
"""


def test_checkpointing_snippet_runs_on_the_users_model(shell: Any) -> None:
    """The snippet does to the model what the dry run did to its copy; pasted, then the cell fits."""
    shell.run(BLOCKS)
    cell = (
        "loss = model(torch.randn(1024, 512)).logsumexp(-1).mean()\nloss.backward()\n"
        "opt.step(); opt.zero_grad(set_to_none=True)"
    )
    limit = shell.allocated() + 110 * MiB
    report = oom_report(shell, cell, limit, batch_var=None)
    top = report.suggestions[0]
    assert top.kind == "gradient_checkpointing" and top.fits is True
    assert 'for block in model.get_submodule("blocks"):' in top.code
    shell.run(top.code)
    assert fits(shell, cell, limit)


@EXACT_SCALE
def test_hugging_face_checkpointing_with_an_attention_mask(shell: Any) -> None:
    """The what-if failed on causal LMs given a mask (the key/value cache stayed on)."""
    transformers = pytest.importorskip("transformers")
    del transformers
    shell.run(
        "import transformers\ntorch.manual_seed(0)\n"
        "model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, "
        "n_positions=256, vocab_size=1000, bos_token_id=0, eos_token_id=0))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "ids = torch.randint(0, 1000, (16, 256))\nmask = torch.ones_like(ids)"
    )
    cell = (
        "out = model(input_ids=ids, attention_mask=mask, labels=ids)\nout.loss.backward()\n"
        "opt.step(); opt.zero_grad(set_to_none=True)"
    )
    limit = shell.allocated() + 200 * MiB
    report = oom_report(shell, cell, limit, batch_var=None)
    top = report.suggestions[0]
    assert top.kind == "gradient_checkpointing" and top.fits is True, report.notes
    assert "model.config.use_cache = False" in top.code
    shell.run(top.code)
    assert fits(shell, cell, limit)


def test_loss_summed_over_micro_batches_gets_backward_in_the_loop(shell: Any) -> None:
    """A summed loss keeps every micro-batch's graph: the advice moves backward() into the loop."""
    shell.run(
        "import torch.nn.functional as F\nfrom torch import nn\ntorch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 10))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "batches = [(torch.randn(512, 256), torch.randint(0, 10, (512,))) for _ in range(8)]"
    )
    cell = (
        "total = 0\nfor x, y in batches:\n    total = total + F.cross_entropy(model(x), y)\n"
        "total.backward()\nopt.step(); opt.zero_grad(set_to_none=True)"
    )
    limit = shell.allocated() + 24 * MiB
    report = oom_report(shell, cell, limit, batch_var=None)
    top = report.suggestions[0]
    assert top.kind == "gradient_accumulation" and top.fits is True
    assert top.params == {"variable": "total", "action": "backward_per_micro_batch"}
    assert top.code.splitlines()[2:5] == [
        "    micro_loss = F.cross_entropy(model(x), y)",
        "    micro_loss.backward()",
        "    total += micro_loss.detach()",
    ]
    assert "total.backward()" not in top.code
    assert fits(shell, top.code, limit)


def test_one_vocabulary_of_kinds() -> None:
    """The ranking, the report and the JSON Schema know the same kinds: a kind added to one
    and not the others raised during an OOM report."""
    from oomnb.analysis.advisor import _PREFERENCE
    from oomnb.model.report import SUGGESTION_KINDS

    schema_kinds = load_schema()["properties"]["suggestions"]["items"]["properties"]["kind"]["enum"]
    assert sorted(_PREFERENCE) == sorted(SUGGESTION_KINDS) == sorted(schema_kinds)
    assert len(_PREFERENCE) == len(set(_PREFERENCE))


def test_a_batch_the_cell_loops_over_gets_no_line_that_changes_nothing(shell: Any) -> None:
    """`for bs in [...]` overwrites `bs = 2048` pasted above: say to change the loop instead."""
    shell.run(SETUP + "bs = 256")
    cell = (
        "for bs in [256, 1024, 8192]:\n    x = torch.randn(bs, 256)\n"
        "    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (bs,)))\n"
        "    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)"
    )
    report = oom_report(shell, cell, shell.allocated() + 12 * MiB, batch_var="bs")
    assert not [s for s in report.suggestions if s.params.get("variable") == "bs"]
    dropped = [n for n in report.notes if n.startswith("the cell sets `bs` in its own loop")]
    assert all("change the loop's values to" in n for n in dropped)


def test_when_nothing_fits_alone_the_combination_is_searched_and_verified() -> None:
    """bf16 alone saves too little and the batch cannot go low enough alone (a fixed 100 MiB of
    activations): together they fit, at the largest batch the dry runs allow."""
    from oomnb.analysis.advisor import advise
    from oomnb.analysis.estimator import DryRun
    from oomnb.model.report import DeviceInfo, OomInfo, Report

    calls: list[tuple[int, bool]] = []

    def run_cell(overrides: dict[str, Any], source: str | None = None, **options: Any) -> DryRun:
        batch = overrides.get("bs", 64)
        if source is not None:  # the literal edit of `bs = 64`
            batch = int(source.split("bs = ")[1].split("\n")[0])
        half = options.get("autocast") is not None
        calls.append((batch, half))
        peak = (100 * MiB + batch * MiB) // (2 if half else 1)
        return DryRun(batch, peak, 0, 0, 0, 0, 0, 0)

    capacity = 80 * MiB
    report = Report(
        cell=1,
        device=DeviceInfo("simulated", "simulated", 0, capacity),
        baseline_bytes=0,
        end_bytes=0,
        peak_bytes=70 * MiB,
        reserved_bytes=0,
        duration_s=0.1,
        oom=OomInfo(32 * MiB, 0, capacity, "out of memory"),
    )
    cell = "bs = 64\nx = torch.randn(bs, 1024)\nmodel(x).sum().backward()"
    advice = advise(report, run_cell=run_cell, cell_source=cell, bf16=True)
    top = advice.suggestions[0]
    assert top.kind == "combination" and top.fits is True and top.apply == "replace_cell"
    # 50 MiB + b/2 MiB <= 76 MiB (5% kept free): b = 52, the largest, verified by its own dry run
    assert top.params == {
        "kinds": ["mixed_precision", "batch_size"],
        "dtype": "bf16",
        "variable": "bs",
        "value": 52,
    }
    assert (52, True) in calls and (53, True) in calls
    assert top.code.splitlines()[:2] == ['with torch.autocast("cpu", dtype=torch.bfloat16):', "    bs = 52"]
    assert top.saves_bytes == (164 - 76) * MiB
    # alone, neither fits: bf16 saves 82 of the 88 MiB needed; no batch fits without it
    precision = next(s for s in advice.suggestions if s.kind == "mixed_precision")
    assert precision.fits is False and precision.saves_bytes == 82 * MiB
    assert not any(s.kind == "batch_size" for s in advice.suggestions)
