"""Variational autoencoder, trained on the ELBO."""
from lightning_modules.vae.model import VAE

__all__ = ["VAE"]
