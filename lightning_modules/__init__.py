"""The generative families, one LightningModule each, behind the contract in `contract.py`."""
