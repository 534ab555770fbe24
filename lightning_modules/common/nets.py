"""Network bodies sized from the data shape, shared by the families that need them: MLPs, and a
convolutional encoder / decoder pair that halves (doubles) the image while it stays even."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Sequence, Tuple

from torch import Tensor, nn


def num_stages(height: int, width: int, smallest: int = 4) -> int:
    """How many stride-2 halvings (H, W) takes exactly while both stay >= smallest (8x8: 1, 28x28: 2, 32x32: 3)."""
    k = 0
    while height % 2 == 0 and width % 2 == 0 and height // 2 >= smallest and width // 2 >= smallest:
        height, width, k = height // 2, width // 2, k + 1
    return k


def mlp_layers(sizes: Sequence[int], activation: Callable[[], nn.Module]) -> List[nn.Module]:
    """[Linear(sizes[0], sizes[1]), activation(), Linear(sizes[1], sizes[2]), activation(), ...]."""
    layers: List[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    return layers


def mlp(d_in: int, hidden: int, d_out: int, depth: int = 2, activation: Callable[[], nn.Module] = nn.SiLU) -> nn.Sequential:
    """`depth` hidden layers of `hidden` units, then a linear output layer (the last module)."""
    return nn.Sequential(*mlp_layers([d_in] + [hidden] * depth, activation), nn.Linear(hidden, d_out))


def _conv_layout(shape) -> Tuple[int, int, int]:
    _, h, w = shape
    k = num_stages(h, w)
    return k, h // 2**k, w // 2**k


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, d_out): a conv, then stride-2 convs doubling channels, then a linear layer."""

    def __init__(self, shape, d_out: int, channels: int = 32):
        super().__init__()
        stages, hs, ws = _conv_layout(shape)
        layers, ch = [nn.Conv2d(shape[0], channels, 3, padding=1), nn.SiLU()], channels
        for _ in range(stages):
            layers += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1), nn.SiLU()]
            ch *= 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * hs * ws, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ConvDecoder(nn.Module):
    """(B, d_in) -> (B, C_out, H, W): the mirror of ConvEncoder with transposed convs."""

    def __init__(self, d_in: int, shape, out_channels: int, channels: int = 32):
        super().__init__()
        stages, hs, ws = _conv_layout(shape)
        ch = channels * 2**stages
        self.seed_shape = (ch, hs, ws)
        layers = [nn.Linear(d_in, ch * hs * ws), nn.SiLU(), nn.Unflatten(1, self.seed_shape)]
        for _ in range(stages):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.SiLU()]
            ch //= 2
        self.body = nn.Sequential(*layers, nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


@contextmanager
def evaluating(module: nn.Module):
    """Eval mode inside the block, the previous mode restored after it."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
