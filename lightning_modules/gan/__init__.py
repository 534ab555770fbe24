"""Generative adversarial network, trained with two time-scales."""
from lightning_modules.gan.model import GAN

__all__ = ["GAN"]
