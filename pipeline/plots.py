"""Pictures of samples and curves (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def save_samples(samples: torch.Tensor, kind: str, path: Path, n: int = 64) -> Path:
    """Images as a grid; 2-D vectors as a scatter plot; sequences of rows as images."""
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if kind == "vector" and samples.shape[1] == 2:
        s = samples[:2000].numpy()
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
    else:
        x = samples[:n].float()
        x = x[:, None] if x.dim() == 3 else x  # (T, D) sequences drawn as 1-channel images
        grid = make_grid(x.clamp(0, 1), nrow=int(n**0.5), padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
