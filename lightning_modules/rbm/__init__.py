"""Restricted Boltzmann machine, trained by contrastive divergence."""
from lightning_modules.rbm.model import RBM

__all__ = ["RBM"]
