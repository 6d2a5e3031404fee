"""OOM scenarios written the way notebooks are written, for the advisor's public suite.

Each scenario is the notebook's earlier cells (``setup``, cells separated by
``CELL``), the cell that runs out of memory, the capacity (headroom over what
the earlier cells left allocated), and the kinds of suggestion that name the
right cause.  The suite applies the top suggestion exactly as the report
says (``apply``) and checks that the same cell then fits.

Nobody passes ``--batch-var`` here: sizes are found from the cell.
"""

from __future__ import annotations

from dataclasses import dataclass

CELL = "\n# -- next cell --\n"
MiB = 1024**2


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: str
    cell: str
    headroom_mib: float
    #: The kinds whose first place names the right cause.
    right: frozenset[str]
    #: Whether the top suggestion can be applied in the session (not a new install or a restart).
    literal: bool = True
    family: str = "torch"
    #: Kinds that must be offered somewhere in the list (the cause recognised, even when not first).
    offered: frozenset[str] = frozenset()


MLP = """
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
"""

CNN = """
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
"""

GPT2 = """
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=1024))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
"""

LLAMA = """
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048,
))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
"""

BERT = """
from transformers import BertConfig, BertForSequenceClassification
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
    vocab_size=1000, max_position_embeddings=512, num_labels=2,
))
"""

VIT = """
from transformers import ViTConfig, ViTForImageClassification
torch.manual_seed(0)
model = ViTForImageClassification(ViTConfig(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
    image_size=224, patch_size=16, num_labels=10,
))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
"""

KEEPER = """
from torch import nn
torch.manual_seed(0)
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(512, 512)
    def forward(self, x):
        h = torch.relu(self.fc(x))
        self.last = h          # kept for plotting later
        return h
model = nn.Sequential(*[Block() for _ in range(6)])
opt = torch.optim.SGD(model.parameters(), lr=0.01)
"""

TRAINER = (
    GPT2
    + """
import tempfile
from transformers import Trainer, TrainingArguments
class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 256
    def __getitem__(self, i):
        ids = torch.randint(0, 1000, (256,))
        return {"input_ids": ids, "labels": ids}
args = TrainingArguments(
    tempfile.mkdtemp(), per_device_train_batch_size=32, max_steps=2, use_cpu=True,
    report_to=[], save_strategy="no", logging_steps=1,
)
trainer = Trainer(model=model, args=args, train_dataset=Tokens())
"""
)

SCENARIOS = [
    Scenario(
        "batch set in the cell",
        MLP,
        "bs = 8192\nx = torch.randn(bs, 256)\ny = torch.randint(0, 10, (bs,))\n"
        "loss = nn.functional.cross_entropy(model(x), y)\nloss.backward()\nopt.step()\nopt.zero_grad()",
        40,
        frozenset({"gradient_accumulation"}),
    ),
    Scenario(
        "batch from an earlier cell",
        MLP + CELL + "batch_size = 8192",
        "x = torch.randn(batch_size, 256)\nloss = model(x).logsumexp(1).mean()\nloss.backward()\n"
        "opt.step()\nopt.zero_grad(set_to_none=True)",
        40,
        frozenset({"gradient_accumulation"}),
    ),
    Scenario(
        "literal batch in the tensors",
        MLP,
        "x = torch.randn(8192, 256)\ny = torch.randint(0, 10, (8192,))\n"
        "loss = nn.functional.cross_entropy(model(x), y)\nloss.backward()\nopt.step()\nopt.zero_grad()",
        40,
        frozenset({"batch_size", "mixed_precision"}),
    ),
    Scenario(
        "training through a function defined earlier",
        MLP + CELL + "def train_step(model, opt, n):\n    x = torch.randn(n, 256)\n    loss = model(x).pow(2).mean()\n"
        "    loss.backward()\n    opt.step()\n    opt.zero_grad()\n    return loss.item()",
        "bs = 8192\nfor _ in range(2):\n    train_step(model, opt, bs)",
        40,
        frozenset({"batch_size", "mixed_precision"}),
    ),
    Scenario(
        "a function reading the global batch size",
        MLP + CELL + "batch_size = 8192\ndef step():\n    loss = model(torch.randn(batch_size, 256)).pow(2).mean()\n"
        "    loss.backward()\n    opt.step()\n    opt.zero_grad()",
        "step()",
        40,
        frozenset({"batch_size", "mixed_precision"}),
    ),
    Scenario(
        "a loss summed over micro-batches",
        MLP,
        "total = 0\nfor i in range(8):\n    x = torch.randn(1024, 256)\n"
        "    total = total + model(x).pow(2).mean()\ntotal.backward()\nopt.step()\nopt.zero_grad()",
        24,
        frozenset({"gradient_accumulation"}),
    ),
    Scenario(
        "losses kept with their graphs",
        MLP + CELL + "losses = []\nfor _ in range(6):\n    losses.append(model(torch.randn(1024, 256)).pow(2).mean())",
        "x = torch.randn(2048, 256)\nloss = model(x).pow(2).mean()\nloss.backward()\nopt.step()\nopt.zero_grad()",
        12,
        frozenset({"free_references"}),
    ),
    Scenario(
        "a stored loss keeps its graph",
        MLP + CELL + "loss = model(torch.randn(6144, 256)).pow(2).mean()",
        "out = model(torch.randn(2048, 256))\nout.pow(2).mean().backward()\nopt.step()\nopt.zero_grad()",
        12,
        frozenset({"free_references"}),
    ),
    Scenario(
        "an old tensor the cell does not use",
        MLP + CELL + "cache = torch.randn(24 * 1024 * 1024 // 4)",
        "x = torch.randn(2048, 256)\nmodel(x).pow(2).mean().backward()\nopt.step()\nopt.zero_grad()",
        14,
        frozenset({"free_references"}),
    ),
    Scenario(
        "the output cache holds a result",
        MLP + CELL + "torch.randn(16 * 1024 * 1024 // 4)",
        "x = torch.randn(2048, 256)\nmodel(x).pow(2).mean().backward()\nopt.step()\nopt.zero_grad()",
        22,
        frozenset({"clear_output_cache"}),
    ),
    Scenario(
        "the last traceback holds a tensor",
        MLP
        + CELL
        + "def load():\n    big = torch.ones(16 * 1024 * 1024 // 4)\n    raise ValueError('bad file')"
        + CELL
        + "load()  # fails on purpose",
        "x = torch.randn(2048, 256)\nmodel(x).pow(2).mean().backward()\nopt.step()\nopt.zero_grad()",
        22,
        frozenset({"clear_traceback"}),
    ),
    Scenario(
        "evaluation without no_grad",
        MLP + CELL + "batch_size = 2048",
        "preds = model(torch.randn(batch_size, 256)).argmax(1)\nacc = (preds == 0).float().mean()",
        24,
        frozenset({"no_grad"}),
    ),
    Scenario(
        "activations kept on module attributes",
        KEEPER + CELL + "print(model(torch.randn(4096, 512)).shape)",
        "x = torch.randn(1024, 512)\nmodel(x).sum().backward()\nopt.step()\nopt.zero_grad()",
        10,
        # Clearing them frees 64 MiB now, but forward stores them again: whether the cell then
        # fits is unknown, so a measured change that fits ranks first; the attributes must be named.
        frozenset({"free_references", "batch_size", "mixed_precision"}),
        offered=frozenset({"free_references"}),
    ),
    Scenario(
        "a 4K image into a CNN",
        CNN + CELL + "img = torch.randn(1, 3, 2160, 3840)",
        "with torch.no_grad():\n    logits = model(img)",
        600,
        # bf16 changes numerics only, so it ranks before a smaller image; the image must be named too
        frozenset({"input_size", "mixed_precision"}),
        offered=frozenset({"input_size"}),
    ),
    Scenario(
        "a large literal image size in the cell",
        CNN,
        "x = torch.randn(2, 3, 1536, 1536)\nloss = model(x).logsumexp(1).mean()\nloss.backward()\nopt.step()",
        400,
        frozenset({"input_size", "batch_size", "mixed_precision"}),
    ),
    Scenario(
        "sequence length from an earlier cell",
        MLP + CELL + "seq_len = 16384",
        "h = model(torch.randn(seq_len, 256))\nh.sum().backward()\nopt.zero_grad()",
        60,
        frozenset({"input_size", "mixed_precision"}),
    ),
    Scenario(
        "a DataLoader batch",
        MLP + CELL + "from torch.utils.data import DataLoader, TensorDataset\n"
        "ds = TensorDataset(torch.randn(8192, 256), torch.randint(0, 10, (8192,)))",
        "bs = 4096\nloader = DataLoader(ds, batch_size=bs)\nxb, yb = next(iter(loader))\n"
        "loss = nn.functional.cross_entropy(model(xb), yb)\nloss.backward()\nopt.step()\nopt.zero_grad()",
        40,
        frozenset({"gradient_accumulation"}),
    ),
    Scenario(
        "weights, gradients and Adam state over capacity",
        "from torch import nn\nmodel = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])\n"
        "opt = torch.optim.Adam(model.parameters())",
        "model(torch.randn(8, 1024)).sum().backward()\nopt.step()",
        20,
        frozenset({"sharding", "optimizer", "quantization"}),
        literal=False,
    ),
    Scenario(
        "GPT-2 training, batch in the cell",
        GPT2,
        "bs = 64\nidx = torch.randint(0, 1000, (bs, 256))\nloss = model(idx, labels=idx).loss\n"
        "loss.backward()\nopt.step()\nopt.zero_grad()",
        300,
        frozenset({"gradient_accumulation", "gradient_checkpointing"}),
        family="transformers",
    ),
    Scenario(
        "GPT-2 with a loss summed over micro-batches",
        GPT2,
        "total = 0\nfor chunk in range(4):\n    idx = torch.randint(0, 1000, (8, 256))\n"
        "    total = total + model(idx, labels=idx).loss\ntotal.backward()\nopt.step()\nopt.zero_grad()",
        280,
        frozenset({"gradient_accumulation"}),
        family="transformers",
    ),
    Scenario(
        "Llama with an attention mask",
        LLAMA,
        "batch_size = 32\nids = torch.randint(0, 1000, (batch_size, 256))\nmask = torch.ones_like(ids)\n"
        "out = model(input_ids=ids, attention_mask=mask, labels=ids)\nout.loss.backward()\nopt.step()\n"
        "opt.zero_grad()",
        250,
        frozenset({"gradient_accumulation", "gradient_checkpointing"}),
        family="transformers",
    ),
    Scenario(
        "BERT evaluation without no_grad",
        BERT + CELL + "ids = torch.randint(0, 1000, (128, 256))",
        "logits = model(input_ids=ids).logits\npreds = logits.argmax(-1)",
        560,
        frozenset({"no_grad"}),
        family="transformers",
    ),
    Scenario(
        "ViT training with a literal batch",
        VIT,
        "pixels = torch.randn(64, 3, 224, 224)\nlabels = torch.randint(0, 10, (64,))\n"
        "loss = model(pixel_values=pixels, labels=labels).loss\nloss.backward()\nopt.step()\nopt.zero_grad()",
        200,
        frozenset({"batch_size", "mixed_precision", "gradient_checkpointing"}),
        family="transformers",
    ),
    Scenario(
        "GPT-2 long sequences from an earlier cell",
        GPT2 + CELL + "seq_len = 1024",
        "idx = torch.randint(0, 1000, (8, seq_len))\nloss = model(idx, labels=idx).loss\nloss.backward()\n"
        "opt.step()\nopt.zero_grad()",
        200,
        frozenset({"gradient_checkpointing", "input_size", "mixed_precision", "batch_size"}),
        family="transformers",
    ),
    Scenario(
        "GPT-2 token ids held by the notebook",
        GPT2 + CELL + "ids = torch.randint(0, 1000, (16, 1024))",
        "with torch.no_grad():\n    logits = model(ids).logits",
        120,
        frozenset({"input_size"}),
        family="transformers",
    ),
    Scenario(
        "a stored Hugging Face output keeps its graph",
        GPT2 + CELL + "idx = torch.randint(0, 1000, (16, 256))\nout = model(idx, labels=idx)",
        "idx = torch.randint(0, 1000, (8, 256))\nloss = model(idx, labels=idx).loss\nloss.backward()\n"
        "opt.step()\nopt.zero_grad()",
        120,
        frozenset({"free_references"}),
        family="transformers",
    ),
    Scenario(
        "Hugging Face Trainer",
        TRAINER,
        "trainer.train()",
        300,
        frozenset({"gradient_accumulation", "gradient_checkpointing"}),
        family="transformers",
    ),
]
