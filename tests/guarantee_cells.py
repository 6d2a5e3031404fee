"""A corpus of notebook cells for the guarantee "nothing you own is changed or lost".

Each :class:`Scenario` is what a user would have in a notebook: setup cells
(run as ordinary cells, before anything is measured), then the one cell put
under ``%%gpumem``, and what that cell's single real execution does:

* ``oom``: what it does before it runs out of memory on a device whose
  capacity is the memory in use before the cell plus ``headroom_mib`` (the
  line it fails on is ``oom_at``, in the cell or in a function it calls);
* ``ok``: what one complete execution does.

The cells are written the way people write them (globals used by functions
defined earlier, counters, lists, prints, log files, checkpoints, names
rebound to wrappers and views), not shaped for the tool.  Sizes stay small:
models of a few MiB, every cell well under 100 MiB of real memory.

``grows`` names the objects that existed before the cell and that the failed
cell's own execution left holding new device memory (a tensor appended to an
existing list, activations kept on a module's attribute): memory may then
stay above the cell's baseline after the OOM, and the report must say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from textwrap import dedent

__all__ = ["SCENARIOS", "Effects", "Scenario"]


@dataclass(frozen=True)
class Effects:
    """What one execution of a cell does, counted."""

    #: expression (a name or ``obj.attr``) -> how much its integer value goes up
    counters: Mapping[str, int] = field(default_factory=dict)
    #: expression of a list that existed before -> items appended
    appends: Mapping[str, int] = field(default_factory=dict)
    #: file in the working folder -> lines appended
    lines: Mapping[str, int] = field(default_factory=dict)
    #: files created or rewritten
    writes: tuple[str, ...] = ()
    #: lines printed that start with the scenario's ``says``
    prints: int = 0


NOTHING = Effects()


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: tuple[str, ...]
    cell: str
    headroom_mib: float
    oom_at: str
    oom: Effects = NOTHING
    ok: Effects = NOTHING
    batch_var: str | None = None
    says: str = ""
    grows: tuple[str, ...] = ()
    #: The cell's optimizer steps completed before the OOM: the state they
    #: created stays with the weights they updated, and the report says so.
    steps_completed: bool = False
    note: str = ""

    def __str__(self) -> str:
        return self.name


def _cells(*cells: str) -> tuple[str, ...]:
    return tuple(dedent(c).strip() for c in cells)


# -- setup cells used by several scenarios ------------------------------------------
IMPORTS = """
import torch
from torch import nn
import torch.nn.functional as F
"""

MLP = """
model = nn.Sequential(nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 128))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
"""

# 8 MiB of weights: Adam's state (16 MiB) is what does not fit.
WIDE = """
model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
"""

TRAIN_STEP = """
def train_step(bs):
    x = torch.randn(bs, 128)
    y = torch.randn(bs, 128)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()
"""

TRAIN_STEP_WIDE = """
def train_step(bs):
    x = torch.randn(bs, 1024)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()
"""

HF_MODEL = '''
from dataclasses import dataclass

@dataclass
class TinyConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 2
    pad_token_id: int = 0


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyLM(nn.Module):
    """A causal LM in the Hugging Face style: config in, .loss and .logits out."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(config.hidden_size, 4 * config.hidden_size), nn.GELU(),
                          nn.Linear(4 * config.hidden_size, config.hidden_size))
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


model = TinyLM(TinyConfig())
opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
'''

HF_BATCH = """
def make_batch(batch_size, seq_len=128):
    input_ids = torch.randint(1, 4096, (batch_size, seq_len))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
"""


SCENARIOS: list[Scenario] = [
    # -- training steps through a function that uses the global model and opt ------------
    Scenario(
        name="train_step_global_forward",
        setup=_cells(IMPORTS, MLP, TRAIN_STEP, "train_step(32)  # warm up: Adam has its state"),
        cell="bs = 2048\nloss = train_step(bs)",
        headroom_mib=9,
        oom_at="loss = F.mse_loss(model(x), y)",
        batch_var="bs",
        note="the function reads model and opt as globals; the OOM is in the forward",
    ),
    Scenario(
        name="train_step_global_backward",
        setup=_cells(IMPORTS, MLP, TRAIN_STEP, "train_step(32)"),
        cell="bs = 1024\nloss = train_step(bs)",
        headroom_mib=11,
        oom_at="loss.backward()",
        batch_var="bs",
        note="the OOM is inside backward; no gradient existed before the cell",
    ),
    Scenario(
        name="train_step_lazy_adam",
        setup=_cells(IMPORTS, WIDE, TRAIN_STEP_WIDE),
        cell="bs = 64\ntrain_step(bs)",
        headroom_mib=20,
        oom_at="opt.step()",
        batch_var="bs",
        note="Adam has no state yet: its first step creates it and runs out part way",
    ),
    Scenario(
        name="train_step_adam_with_state",
        setup=_cells(IMPORTS, WIDE, TRAIN_STEP_WIDE, "train_step(8)\ntrain_step(8)"),
        cell="bs = 64\ntrain_step(bs)",
        headroom_mib=12,
        oom_at="opt.step()",
        batch_var="bs",
        note="Adam's state exists: the step updates part of it in place, then needs a temporary",
    ),
    Scenario(
        name="train_step_global_counter",
        setup=_cells(
            IMPORTS,
            MLP,
            """
            step = 0
            losses = []

            def train_step(bs):
                global step
                step += 1
                x = torch.randn(bs, 128)
                loss = F.mse_loss(model(x), torch.zeros(bs, 128))
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            """,
        ),
        cell="train_step(2048)",
        headroom_mib=8,
        oom_at="loss = F.mse_loss(model(x), torch.zeros(bs, 128))",
        oom=Effects(counters={"step": 1}),
        ok=Effects(counters={"step": 1}, appends={"losses": 1}),
        note="a global counter and a list, changed inside the function",
    ),
    Scenario(
        name="batch_size_loop_in_cell",
        setup=_cells(IMPORTS, MLP, TRAIN_STEP, "results = {}"),
        cell="""
        for bs in [128, 512, 2048]:
            results[bs] = train_step(bs)
            print(f"bs={bs} loss={results[bs]:.4f}")
        """,
        headroom_mib=15,
        oom_at="loss = F.mse_loss(model(x), y)",
        oom=Effects(prints=2),
        ok=Effects(prints=3),
        says="bs=",
        steps_completed=True,
        note="finding the batch size by hand: two sizes fit (their steps complete), the third does not",
    ),
    # -- counters, lists, prints, files --------------------------------------------------
    Scenario(
        name="counter_then_oom",
        setup=_cells(IMPORTS, MLP, "step = 0"),
        cell="""
        step += 1
        x = torch.randn(2048, 128)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        """,
        headroom_mib=8,
        oom_at="loss = model(x).pow(2).mean()",
        oom=Effects(counters={"step": 1}),
        ok=Effects(counters={"step": 1}),
    ),
    Scenario(
        name="losses_list_append",
        setup=_cells(IMPORTS, MLP, "losses = []"),
        cell="""
        for bs in (256, 512, 4096):
            x = torch.randn(bs, 128)
            loss = model(x).pow(2).mean()
            losses.append(loss.item())
        """,
        headroom_mib=20,
        oom_at="loss = model(x).pow(2).mean()",
        oom=Effects(appends={"losses": 2}),
        ok=Effects(appends={"losses": 3}),
    ),
    Scenario(
        name="print_progress",
        setup=_cells(IMPORTS, MLP, "epoch = 3\nbatch_size = 4096"),
        cell="""
        print(f"epoch {epoch}: batch size {batch_size}")
        out = model(torch.randn(batch_size, 128))
        print(f"epoch {epoch}: output {tuple(out.shape)}")
        """,
        headroom_mib=16,
        oom_at="out = model(torch.randn(batch_size, 128))",
        oom=Effects(prints=1),
        ok=Effects(prints=2),
        batch_var="batch_size",
        says="epoch",
    ),
    Scenario(
        name="log_file_lines",
        setup=_cells(
            IMPORTS,
            MLP,
            TRAIN_STEP,
            """
            with open("train.log", "w") as f:
                f.write("bs,loss\\n")
            """,
        ),
        cell="""
        for bs in [64, 256, 2048]:
            loss = train_step(bs)
            with open("train.log", "a") as f:
                f.write(f"{bs},{loss:.5f}\\n")
        """,
        headroom_mib=13,
        oom_at="loss = F.mse_loss(model(x), y)",
        oom=Effects(lines={"train.log": 2}),
        ok=Effects(lines={"train.log": 3}),
        steps_completed=True,
    ),
    Scenario(
        name="checkpoint_then_oom",
        setup=_cells(IMPORTS, MLP, TRAIN_STEP, "train_step(32)"),
        cell="""
        train_step(64)
        torch.save(model.state_dict(), "ckpt.pt")
        print("saved ckpt.pt")
        train_step(4096)
        """,
        headroom_mib=20,
        oom_at="loss = F.mse_loss(model(x), y)",
        oom=Effects(writes=("ckpt.pt",), prints=1),
        ok=Effects(writes=("ckpt.pt",), prints=1),
        says="saved",
        note="the checkpoint is written once, by the real run, with the real weights",
    ),
    Scenario(
        name="oom_before_checkpoint",
        setup=_cells(IMPORTS, MLP, TRAIN_STEP, 'train_step(32)\ntorch.save(model.state_dict(), "ckpt.pt")'),
        cell="""
        batch_size = 2048
        loss = train_step(batch_size)
        torch.save(model.state_dict(), "ckpt.pt")
        """,
        headroom_mib=9,
        oom_at="loss = F.mse_loss(model(x), y)",
        ok=Effects(writes=("ckpt.pt",)),
        batch_var="batch_size",
        note="yesterday's checkpoint must not be overwritten by anything but a real run that gets there",
    ),
    Scenario(
        name="masked_loss_checkpoint_log",
        setup=_cells(
            IMPORTS,
            MLP,
            """
            def train_step(bs):
                x = torch.randn(bs, 128)
                y = torch.randn(bs, 128)
                valid = y[:, 0] > 0  # only the samples with a positive target
                loss = F.mse_loss(model(x[valid]), y[valid])
                loss.backward()
                opt.step()
                opt.zero_grad()
                return loss.item()
            """,
            'train_step(32)\ntorch.save(model.state_dict(), "ckpt.pt")',
            "batch_size = 4096",
        ),
        cell="""
        loss = train_step(batch_size)
        torch.save(model.state_dict(), "ckpt.pt")
        with open("train.log", "a") as f:
            f.write(f"{batch_size},{loss:.5f}\\n")
        """,
        headroom_mib=12,
        oom_at="loss = F.mse_loss(model(x[valid]), y[valid])",
        ok=Effects(writes=("ckpt.pt",), lines={"train.log": 1}),
        batch_var="batch_size",
        note="boolean masks give shapes that depend on values: a dry run cannot take the cell (real probes can)",
    ),
    Scenario(
        name="save_optimizer_state",
        setup=_cells(IMPORTS, MLP, TRAIN_STEP, "train_step(32)"),
        cell="""
        loss = train_step(2048)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "state.pt")
        """,
        headroom_mib=9,
        oom_at="loss = F.mse_loss(model(x), y)",
        ok=Effects(writes=("state.pt",)),
        note="the optimizer's state must stay real tensors (torch.save fails on fake ones)",
    ),
    # -- names rebound to objects that wrap, view or convert the old ones ----------------
    Scenario(
        name="wrapper_module",
        setup=_cells(
            IMPORTS,
            MLP,
            """
            class Scaled(nn.Module):
                def __init__(self, inner, scale=0.5):
                    super().__init__()
                    self.inner = inner
                    self.scale = scale

                def forward(self, x):
                    return self.inner(x) * self.scale
            """,
        ),
        cell="model = Scaled(model)\nout = model(torch.randn(4096, 128))",
        headroom_mib=16,
        oom_at="return self.inner(x) * self.scale",
    ),
    Scenario(
        name="data_parallel",
        setup=_cells(IMPORTS, MLP),
        cell="model = nn.DataParallel(model)\nout = model(torch.randn(4096, 128))",
        headroom_mib=16,
        oom_at="out = model(torch.randn(4096, 128))",
        note="on a machine without CUDA, DataParallel just calls the module",
    ),
    Scenario(
        name="view_rebind",
        setup=_cells(IMPORTS, MLP, "x = torch.randn(2048, 256)"),
        cell="x = x.view(-1, 128)\nh = model(x)",
        headroom_mib=16,
        oom_at="h = model(x)",
    ),
    Scenario(
        name="reshape_rebind",
        setup=_cells(IMPORTS, MLP, "images = torch.randn(2048, 8, 16)"),
        cell="images = images.reshape(len(images), -1)\nfeatures = model(images)",
        headroom_mib=8,
        oom_at="features = model(images)",
    ),
    Scenario(
        name="unsqueeze_rebind",
        setup=_cells(IMPORTS, HF_MODEL, "input_ids = torch.randint(1, 4096, (1024,))"),
        cell="input_ids = input_ids.unsqueeze(0)\nlogits = model(input_ids).logits",
        headroom_mib=18,
        oom_at="logits = self.lm_head(self.norm(h))",
    ),
    Scenario(
        name="detach_rebind",
        setup=_cells(IMPORTS, MLP, "emb = model[0](torch.randn(1024, 128))"),
        cell="emb = emb.detach()\nsim = emb @ emb.T",
        headroom_mib=2,
        oom_at="sim = emb @ emb.T",
    ),
    Scenario(
        name="from_numpy_rebind",
        setup=_cells(
            IMPORTS,
            MLP,
            "import numpy as np\narr = np.random.default_rng(0).standard_normal((2048, 128), dtype=np.float32)",
        ),
        cell="arr = torch.from_numpy(arr)\nout = model(arr)",
        headroom_mib=8,
        oom_at="out = model(arr)",
        grows=("arr",),
        note="the NumPy buffer existed before; the device counts it from the moment an op uses it as a tensor",
    ),
    Scenario(
        name="swap_names",
        setup=_cells(IMPORTS, MLP, "a = torch.randn(2048, 128)\nb = torch.randn(2048, 128)"),
        cell="a, b = b, a\nout = model(torch.cat([a, b]))",
        headroom_mib=16,
        oom_at="out = model(torch.cat([a, b]))",
    ),
    Scenario(
        name="old_and_new_model",
        setup=_cells(IMPORTS, MLP),
        cell="""
        old = model
        model = nn.Sequential(nn.Linear(128, 2048), nn.ReLU(), nn.Linear(2048, 128))
        out = model(torch.randn(2048, 128))
        """,
        headroom_mib=18,
        oom_at="out = model(torch.randn(2048, 128))",
    ),
    Scenario(
        name="dict_rebuilt",
        setup=_cells(IMPORTS, MLP, 'data = {"x": torch.randn(2048, 128), "y": torch.randn(2048, 128)}'),
        cell="""
        data = dict(data, mask=torch.ones(2048, dtype=torch.bool))
        out = model(torch.cat([data["x"], data["y"]]))
        """,
        headroom_mib=16,
        oom_at='out = model(torch.cat([data["x"], data["y"]]))',
        grows=("data",),
        note="the new dict holds tensors from before the cell, so it stays, and with it the new mask",
    ),
    Scenario(
        name="global_rebind_in_function",
        setup=_cells(
            IMPORTS,
            MLP,
            """
            def add_dropout(p=0.1):
                global model
                model = nn.Sequential(model, nn.Dropout(p))
            """,
        ),
        cell="add_dropout()\nout = model(torch.randn(4096, 128))",
        headroom_mib=16,
        oom_at="out = model(torch.randn(4096, 128))",
    ),
    Scenario(
        name="same_object_rebind",
        setup=_cells(IMPORTS, MLP),
        cell="model = model.to(torch.float32).train()\nout = model(torch.randn(4096, 128))",
        headroom_mib=16,
        oom_at="out = model(torch.randn(4096, 128))",
        note="already safe: the name keeps the same object",
    ),
    Scenario(
        name="new_optimizer",
        setup=_cells(IMPORTS, MLP, TRAIN_STEP, "train_step(32)"),
        cell="opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)\ntrain_step(2048)",
        headroom_mib=8,
        oom_at="loss = F.mse_loss(model(x), y)",
        note="the cell itself drops the old Adam; the new SGD points at the old model's parameters",
    ),
    # -- gradients and optimizer state --------------------------------------------------
    Scenario(
        name="accumulated_grads_backward_oom",
        setup=_cells(
            IMPORTS,
            "model = nn.Sequential(nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 128))",
            "loss = model(torch.randn(64, 128)).pow(2).mean()\nloss.backward()  # accumulate, no zero_grad",
        ),
        cell="""
        out = model(torch.randn(1024, 128))
        loss = out.pow(2).mean()
        loss.backward()
        """,
        headroom_mib=11,
        oom_at="loss.backward()",
        note="gradients accumulated by an earlier cell; the backward that runs out adds to some of them",
    ),
    Scenario(
        name="accumulated_grads_forward_oom",
        setup=_cells(
            IMPORTS,
            "model = nn.Sequential(nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 128))",
            "loss = model(torch.randn(64, 128)).pow(2).mean()\nloss.backward()",
        ),
        cell="loss = model(torch.randn(4096, 128)).pow(2).mean()\nloss.backward()",
        headroom_mib=16,
        oom_at="loss = model(torch.randn(4096, 128)).pow(2).mean()",
    ),
    Scenario(
        name="grad_accumulation_loop",
        setup=_cells(IMPORTS, MLP.replace("Adam", "SGD").replace("lr=1e-3", "lr=1e-2"), "accum_steps = 4"),
        cell="""
        for i, bs in enumerate([256, 256, 1024, 256]):
            loss = model(torch.randn(bs, 128)).pow(2).mean() / accum_steps
            loss.backward()
        opt.step()
        opt.zero_grad()
        """,
        headroom_mib=11,
        oom_at="loss.backward()",
        note="two micro-batches' gradients are in, the third backward runs out",
    ),
    Scenario(
        name="lazy_adam_in_cell",
        setup=_cells(IMPORTS, WIDE, "x = torch.randn(64, 1024)"),
        cell="""
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        """,
        headroom_mib=20,
        oom_at="opt.step()",
    ),
    Scenario(
        name="lr_scheduler_step",
        setup=_cells(
            IMPORTS,
            MLP,
            TRAIN_STEP,
            "sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)\ntrain_step(32)",
        ),
        cell="""
        sched.step()
        print(f"lr now {sched.get_last_lr()[0]:.2e}")
        loss = train_step(2048)
        """,
        headroom_mib=9,
        oom_at="loss = F.mse_loss(model(x), y)",
        oom=Effects(prints=1),
        ok=Effects(prints=1),
        says="lr now",
        note="the learning rate is halved once, by the real run",
    ),
    Scenario(
        name="manual_weight_decay",
        setup=_cells(
            IMPORTS,
            MLP,
            """
            def decay_weights(factor=0.99):
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(factor)
            """,
        ),
        cell="decay_weights()\nout = model(torch.randn(4096, 128))",
        headroom_mib=16,
        oom_at="out = model(torch.randn(4096, 128))",
        note="an in-place change to the real weights, through a function: it must happen exactly once",
    ),
    # -- Hugging Face style ---------------------------------------------------------------
    Scenario(
        name="hf_loss_backward",
        setup=_cells(IMPORTS, HF_MODEL, HF_BATCH, "batch = make_batch(4)"),
        cell="""
        outputs = model(**batch)
        outputs.loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"loss {outputs.loss.item():.3f}")
        """,
        headroom_mib=21,
        oom_at="loss = F.cross_entropy(",
        ok=Effects(prints=1),
        says="loss",
    ),
    Scenario(
        name="hf_train_function",
        setup=_cells(
            IMPORTS,
            HF_MODEL,
            HF_BATCH,
            """
            history = []

            def train_step(batch):
                outputs = model(**batch)
                outputs.loss.backward()
                opt.step()
                opt.zero_grad()
                history.append(outputs.loss.item())
                return outputs.loss
            """,
        ),
        cell="batch_size = 2\nbatch = make_batch(batch_size)\nloss = train_step(batch)",
        headroom_mib=21,
        oom_at="opt.step()",
        ok=Effects(appends={"history": 1}),
        batch_var="batch_size",
        note="AdamW has no state yet: its first step runs out",
    ),
    # -- memory the cell legitimately leaves in objects that existed before ----------------
    Scenario(
        name="activations_on_module",
        setup=_cells(
            IMPORTS,
            """
            class Probe(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.body = nn.Sequential(nn.Linear(128, 1024), nn.ReLU())
                    self.head = nn.Linear(1024, 4096)

                def forward(self, x):
                    self.features = self.body(x)  # kept to look at later
                    return self.head(self.features)

            net = Probe()
            net(torch.randn(8, 128)).shape
            """,
        ),
        cell="out = net(torch.randn(1024, 128))",
        headroom_mib=14,
        oom_at="return self.head(self.features)",
        grows=("net",),
        note="the forward stores its activations on the module before the head runs out",
    ),
    Scenario(
        name="losses_keep_graphs",
        setup=_cells(IMPORTS, MLP, "losses = []"),
        cell="""
        for bs in (512, 512, 4096):
            loss = model(torch.randn(bs, 128)).pow(2).mean()
            losses.append(loss)
        """,
        headroom_mib=20,
        oom_at="loss = model(torch.randn(bs, 128)).pow(2).mean()",
        oom=Effects(appends={"losses": 2}),
        ok=Effects(appends={"losses": 3}),
        grows=("losses",),
        note="the classic leak: each stored loss keeps its graph",
    ),
    Scenario(
        name="cache_dict_filled",
        setup=_cells(IMPORTS, MLP, "cache = {}"),
        cell="""
        cache["hidden"] = model[:2](torch.randn(512, 128)).detach()
        out = model(torch.randn(4096, 128))
        """,
        headroom_mib=20,
        oom_at="out = model(torch.randn(4096, 128))",
        grows=("cache",),
    ),
    Scenario(
        name="loss_summed_over_microbatches",
        setup=_cells(IMPORTS, MLP, "data = torch.randn(2048, 128)"),
        cell="""
        total = 0
        for chunk in data.split(256):
            total = total + model(chunk).pow(2).mean()
        total.backward()
        opt.step()
        """,
        headroom_mib=5,
        oom_at="total = total + model(chunk).pow(2).mean()",
        note="every micro-batch's graph is kept by the running sum",
    ),
    # -- other shapes of training cells ---------------------------------------------------
    Scenario(
        name="trainer_object",
        setup=_cells(
            IMPORTS,
            MLP,
            """
            class Trainer:
                def __init__(self, model, opt):
                    self.model = model
                    self.opt = opt
                    self.steps = 0
                    self.history = []

                def fit_batch(self, x):
                    self.steps += 1
                    loss = self.model(x).pow(2).mean()
                    loss.backward()
                    self.opt.step()
                    self.opt.zero_grad()
                    self.history.append(loss.item())

            trainer = Trainer(model, opt)
            """,
        ),
        cell="trainer.fit_batch(torch.randn(2048, 128))",
        headroom_mib=8,
        oom_at="loss = self.model(x).pow(2).mean()",
        oom=Effects(counters={"trainer.steps": 1}),
        ok=Effects(counters={"trainer.steps": 1}, appends={"trainer.history": 1}),
    ),
    Scenario(
        name="dataloader_epoch",
        setup=_cells(
            IMPORTS,
            """
            from torch.utils.data import DataLoader, TensorDataset

            X, Y = torch.randn(1024, 128), torch.randint(0, 10, (1024,))
            loader = DataLoader(TensorDataset(X, Y), batch_size=512)
            model = nn.Sequential(nn.Linear(128, 4096), nn.ReLU(), nn.Linear(4096, 10))
            opt = torch.optim.Adam(model.parameters())
            step = 0
            """,
        ),
        cell="""
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
        """,
        headroom_mib=26.5,
        oom_at="loss.backward()",
        oom=Effects(counters={"step": 1}),
        ok=Effects(counters={"step": 2}),
        steps_completed=True,
        note="the first batch's step completes (Adam's state is created), the second batch's backward runs out",
    ),
    Scenario(
        name="eval_no_grad",
        setup=_cells(IMPORTS, MLP, "test_x = torch.randn(4096, 128)"),
        cell="""
        model.eval()
        with torch.no_grad():
            preds = model(test_x)
        model.train()
        """,
        headroom_mib=16,
        oom_at="preds = model(test_x)",
        note="the real run left the model in eval mode; that stays",
    ),
    Scenario(
        name="del_then_oom",
        setup=_cells(IMPORTS, MLP, "old_batch = torch.randn(2048, 128)"),
        cell="del old_batch\nout = model(torch.randn(4096, 128))",
        headroom_mib=16,
        oom_at="out = model(torch.randn(4096, 128))",
        note="the cell itself deletes a name: that is its own effect",
    ),
]
