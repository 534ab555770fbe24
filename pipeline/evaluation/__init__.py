"""Evaluation: the feature network and feature spaces, sample metrics, scoring of a trained model and the
comparison table. It knows the families only through `lightning_modules.contract`."""
