"""Gaussian mixture model, trained by exact EM."""
from lightning_modules.gmm.model import GMM

__all__ = ["GMM"]
