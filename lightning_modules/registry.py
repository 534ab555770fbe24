"""Family name -> LightningModule class. Imports are lazy so the CLI starts fast."""
from __future__ import annotations

import importlib

FAMILIES = {
    "gmm": "lightning_modules.gmm:GMM",
    "hmm": "lightning_modules.hmm:HMM",
    "rbm": "lightning_modules.rbm:RBM",
    "vae": "lightning_modules.vae:VAE",
    "gan": "lightning_modules.gan:GAN",
    "flow": "lightning_modules.flow:Flow",
    "diffusion": "lightning_modules.diffusion:Diffusion",
}


def family_class(name: str):
    if name not in FAMILIES:
        raise KeyError(name)
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def family_config(name: str):
    """The family's config dataclass (its `Config` attribute): the schema of its params.yaml section."""
    return family_class(name).Config
