"""Pictures of samples and curves (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def save_samples(samples: torch.Tensor, kind: str, path: Path, n: int = 64, nrow: Optional[int] = None,
                 labels: Optional[torch.Tensor] = None) -> Path:
    """Images as a grid (`nrow` per row, default square; the figure takes the grid's aspect); 2-D vectors as
    a scatter plot, coloured by `labels` when given; sequences of rows as images."""
    if kind == "vector" and samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        s = samples[:2000].numpy()
        colour = None if labels is None else labels[:2000].numpy()
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5, c=colour, cmap="tab10" if labels is not None else None)
        ax.set_aspect("equal")
    else:
        x = samples[:n].float()
        x = x[:, None] if x.dim() == 3 else x  # (T, D) sequences drawn as 1-channel images
        grid = make_grid(x.clamp(0, 1), nrow=nrow or int(n**0.5), padding=1, pad_value=1.0)
        fig, ax = plt.subplots(figsize=(4, 4 * grid.shape[1] / grid.shape[2]), dpi=100)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_class_grid(samples: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str, path: Path,
                    per_class: int = 8) -> Path:
    """Samples asked for each class: row c of the grid holds class c (images, sequences); 2-D vectors are one
    scatter plot coloured by class."""
    if kind == "vector":
        return save_samples(samples, kind, path, labels=labels)
    blank = torch.ones(per_class, *samples.shape[1:])
    rows = [torch.cat([samples[labels == c][:per_class], blank])[:per_class] for c in range(num_classes)]
    grid = torch.cat(rows)
    return save_samples(grid, kind, path, len(grid), nrow=per_class)
