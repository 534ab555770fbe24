"""The diffusion family (see `model`): the noise schedule (`schedule`), the likelihood bound (`bound`), the
denoisers (`denoisers`) and the samplers (`samplers`)."""
from lightning_modules.diffusion.model import Diffusion

__all__ = ["Diffusion"]
