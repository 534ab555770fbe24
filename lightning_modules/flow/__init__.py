"""Normalizing flow: exact likelihood; its invertible transforms are in `transforms/`."""
from lightning_modules.flow.model import Flow

__all__ = ["Flow"]
