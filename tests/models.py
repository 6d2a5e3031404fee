"""Small models for the estimator's tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class GPT(nn.Module):
    """A small GPT-like decoder: token and position embeddings, causal blocks, tied head."""

    def __init__(self, vocab: int = 512, dim: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        h = self.tok(idx) + self.pos(torch.arange(t))
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 128, num_layers=2, batch_first=True)
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(x)[0][:, -1])


def classification_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor) -> None:
    logits = model(idx[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def workloads() -> dict[str, tuple[nn.Module, Callable[..., Any], tuple[torch.Tensor, ...]]]:
    """name -> (model, step, example inputs); each step takes (model, opt, *inputs)."""
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    encoder = nn.Sequential(
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
        ),
        nn.Flatten(),
        nn.Linear(128 * 32, 10),
    )
    return {
        "mlp": (mlp, classification_step, (torch.randn(64, 256), torch.randint(0, 10, (64,)))),
        "cnn": (cnn, classification_step, (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))),
        "transformer encoder": (
            encoder,
            classification_step,
            (torch.randn(16, 32, 128), torch.randint(0, 10, (16,))),
        ),
        "lstm": (LSTMTagger(), classification_step, (torch.randn(16, 20, 64), torch.randint(0, 10, (16,)))),
        "gpt": (GPT(), lm_step, (torch.randint(0, 512, (8, 65)),)),
    }
