"""Data: the sources registry (`sources.py`), the prepared store on disk (`store.py`) and the Lightning
data module that serves it (`datamodule.py`)."""
