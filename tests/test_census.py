"""The census: exact bytes, names, hidden holders, and no references kept."""

from __future__ import annotations

import sys
import weakref
from typing import Any

import pytest
import torch
from torch import nn

import oomnb
from oomnb.analysis.census import take_census

MiB = 1024**2


def test_a_tensor_and_three_views_are_one_record() -> None:
    t = torch.randn(1024)
    census = take_census({"t": t, "views": [t[:10], t.view(32, 32), t.detach()]})
    assert len(census.records) == 1
    record = census.records[0]
    assert record.path == "t"
    assert record.holder == "variable"
    assert record.nbytes == 4096
    assert record.shape == (1024,)
    assert record.dtype == "float32"
    assert record.device == "cpu"
    assert sorted(record.also_held_by) == ["views[0]", "views[1]", "views[2]"]
    assert census.total_bytes == 4096


def test_containers_and_attributes() -> None:
    class Trainer:
        def __init__(self) -> None:
            self.buffer = torch.zeros(256)  # 1 KiB

    from collections import deque

    census = take_census(
        {
            "cfg": {"a": {"b": [torch.zeros(10)]}},
            "q": deque([torch.zeros(129)]),
            "s": {(1, 2)},
            "tr": Trainer(),
        }
    )
    paths = {r.path: (r.holder, r.nbytes) for r in census.records}
    assert paths["cfg['a']['b'][0]"] == ("container", 512)
    assert paths["q[0]"] == ("container", 1024)
    assert paths["tr.buffer"] == ("attribute", 1024)


def test_module_parameters_gradients_and_optimizer_state_are_named() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    census = take_census({"model": model, "opt": opt})
    by_path = {r.path: r for r in census.records}
    assert by_path["model.0.weight"].holder == "parameter"
    assert by_path["model.0.weight"].nbytes == 64 * 32 * 4
    assert by_path["model.0.weight.grad"].holder == "gradient"
    assert by_path["opt.state[model.0.weight]['exp_avg']"].holder == "optimizer_state"
    assert by_path["opt.state[model.2.bias]['exp_avg_sq']"].nbytes == 512
    weights = 64 * 32 * 4 + 512 + 32 * 4 * 4 + 512  # parameters, each rounded
    assert sum(r.nbytes for r in census.records if r.holder == "parameter") == weights
    assert sum(r.nbytes for r in census.records if r.holder == "gradient") == weights


def adamw_after_one_step() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(1024, 1)  # weight 4096 B, bias 4 B -> 512 B
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1024)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_param_groups_hold_the_parameters_of_a_deleted_model() -> None:
    """Defect: after `del model`, the parameters `opt` still holds were not found."""
    model, opt = adamw_after_one_step()
    del model
    census = take_census({"opt": opt})
    by_path = {r.path: r for r in census.records}
    weight = by_path["opt.param_groups[0]['params'][0]"]
    assert (weight.holder, weight.root, weight.nbytes, weight.shape) == ("optimizer_param", "opt", 4096, (1, 1024))
    bias = by_path["opt.param_groups[0]['params'][1]"]
    assert (bias.holder, bias.root, bias.nbytes) == ("optimizer_param", "opt", 512)
    assert by_path["opt.param_groups[0]['params'][0].grad"].holder == "gradient"
    assert by_path["opt.param_groups[0]['params'][0].grad"].nbytes == 4096
    assert by_path["opt.param_groups[0]['params'][1].grad"].nbytes == 512
    assert by_path["opt.state[param 0]['exp_avg_sq']"].nbytes == 4096
    # two parameters, their gradients and two moments each, and AdamW's two step counters: all under `opt`
    assert census.total_bytes == 4 * (4096 + 512) + 2 * 512
    assert {r.root for r in census.records} == {"opt"}


def test_a_live_module_keeps_naming_its_parameters_and_gradients() -> None:
    model, opt = adamw_after_one_step()
    name = "model_with_a_name_longer_than_the_optimizer_path"
    census = take_census({name: model, "opt": opt})
    by_path = {r.path: r for r in census.records}
    assert by_path[f"{name}.weight"].holder == "parameter"
    assert by_path[f"{name}.weight"].also_held_by == ["opt.param_groups[0]['params'][0]"]
    # the shorter `opt...grad` path does not take the gradient's name from its module
    assert by_path[f"{name}.weight.grad"].holder == "gradient"
    assert by_path[f"{name}.weight.grad"].also_held_by == ["opt.param_groups[0]['params'][0].grad"]
    assert f"opt.state[{name}.bias]['exp_avg']" in by_path
    assert not any(r.path.startswith("opt.param_groups") for r in census.records)
    assert census.total_bytes == 4 * (4096 + 512) + 2 * 512


def test_stored_loss_reports_its_graph() -> None:
    lin = nn.Linear(256, 256)
    x = torch.randn(128, 256)
    loss = lin(x).relu().sum()
    census = take_census({"lin": lin, "loss": loss})
    record = census.find("loss")
    assert record is not None
    # ReLU saves its 128x256 float32 result; the input x is saved by addmm but
    # only the graph holds it here.
    assert record.graph_bytes == 2 * 128 * 256 * 4
    graph = [r for r in census.records if r.holder == "autograd_graph"]
    assert sorted(r.nbytes for r in graph) == [128 * 256 * 4] * 2
    assert all(r.root == "loss" for r in graph)
    loss.backward()
    after = take_census({"lin": lin, "loss": loss})
    assert after.find("loss").graph_bytes == 0  # type: ignore[union-attr]


def test_losses_list_keeps_every_graph() -> None:
    lin = nn.Linear(64, 64)
    losses = [lin(torch.randn(32, 64)).relu().sum() for _ in range(5)]
    census = take_census({"lin": lin, "losses": losses})
    graphs = [r for r in census.records if r.holder == "autograd_graph"]
    assert len(graphs) == 10  # each step saved its input and its ReLU output
    assert sum(r.graph_bytes for r in census.records if r.root == "losses") == 10 * 32 * 64 * 4


def test_cycles_and_deep_nesting_terminate() -> None:
    a: list[Any] = [torch.ones(1)]
    a.append(a)
    deep: Any = torch.ones(2)
    for _ in range(10_000):
        deep = [deep]
    census = take_census({"a": a, "deep": deep})
    assert [r.path for r in census.records] == ["a[0]"]


def test_no_reference_is_kept() -> None:
    t = torch.randn(4096)
    ref = weakref.ref(t.untyped_storage())
    census = take_census({"t": t, "d": {"x": t}})
    assert census.records[0].nbytes == 16384
    del t
    assert ref() is None


def test_in_shell_finds_out_cache_underscore_and_traceback(shell: Any) -> None:
    unreachable_before = oomnb.census().unreachable_bytes or 0  # tensors of other tests in this process
    shell.run("big = torch.ones(1024 * 1024)")
    out = shell.run("torch.zeros(256 * 1024)")  # lands in Out[n] and _
    n = out.execution_count
    shell.run("def f():\n    held = torch.ones(512 * 1024)\n    raise ValueError('boom')\nf()")
    census = oomnb.census()
    by_path = {r.path: r for r in census.records}
    assert by_path["big"].nbytes == 4 * MiB
    assert by_path[f"Out[{n}]"].holder == "output_cache"
    assert "_" in by_path[f"Out[{n}]"].also_held_by
    assert by_path[f"Out[{n}]"].nbytes == MiB
    held = by_path["<traceback> f().held"]
    assert held.holder == "traceback"
    assert held.nbytes == 2 * MiB
    assert census.device == "cpu"
    assert census.allocated_bytes == oomnb.status()["allocated_bytes"]
    # everything the notebook allocated is reachable
    assert census.unreachable_bytes is not None
    assert census.unreachable_bytes - unreachable_before < 64 * 1024
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)


@pytest.mark.parametrize("count", [0, 3])
def test_census_json(count: int) -> None:
    census = take_census({f"t{i}": torch.ones(i + 1) for i in range(count)})
    data = census.to_dict()
    assert data["total_bytes"] == 512 * count
    assert all(isinstance(r["shape"], list) for r in data["records"])
