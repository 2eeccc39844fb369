"""Task heads: one MLP per task token (paper, final prediction).

* disease_progression: 7 task tokens, each -> 3 logits (worsened, improved, no change): [B,7,3]
* mortality: 1 task token -> 1 logit: [B]
* length_of_stay: 1 task token -> 4 logits (LOS bins): [B,4]
"""
from __future__ import annotations

import torch
from torch import nn

from data_sharding.constants import NUM_DISEASES, NUM_LOS_BINS, NUM_PROGRESSION_CLASSES

# task -> (number of task tokens, outputs per token)
TASK_OUTPUTS: dict[str, tuple[int, int]] = {
    "disease_progression": (NUM_DISEASES, NUM_PROGRESSION_CLASSES),
    "mortality": (1, 1),
    "length_of_stay": (1, NUM_LOS_BINS),
}


class TaskHeads(nn.Module):
    """Task token features [B,n_tokens,d] -> the task's logits (shapes above)."""

    def __init__(self, task: str, d_model: int, dropout: float) -> None:
        super().__init__()
        if task not in TASK_OUTPUTS:
            raise ValueError(f"unknown task {task!r}")
        self.task = task
        self.num_tokens, out_dim = TASK_OUTPUTS[task]
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_model, out_dim))
            for _ in range(self.num_tokens)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([head(tokens[:, i]) for i, head in enumerate(self.heads)], dim=1)  # [B,n,out]
        if self.task == "disease_progression":
            return logits
        if self.task == "mortality":
            return logits[:, 0, 0]
        return logits[:, 0]
