"""A tiny language model whose head shares the embedding's weight (torch tests of both exports)."""

from __future__ import annotations

from torch import nn


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mid = nn.Embedding(300, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 300, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(nn.functional.relu(self.mid(self.embed(ids))))
