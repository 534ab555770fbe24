"""The MLflow logger the train stage uses: Lightning's MLFlowLogger, made safe to resume.

A run killed after its last checkpoint may already have logged a few steps past it; the resumed attempt
recomputes those steps (bit for bit on CPU in deterministic mode), so logging them again would only
duplicate them in the run's history. Steps at or below what the run already holds are skipped per key.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only


class ResumableMLFlowLogger(MLFlowLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logged_through: Optional[Dict[str, int]] = None  # key -> last step the run holds

    def _already_logged(self) -> Dict[str, int]:
        if self._logged_through is None:
            client, run_id = self.experiment, self.run_id
            keys = client.get_run(run_id).data.metrics
            self._logged_through = {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in keys}
        return self._logged_through

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        done = self._already_logged()
        fresh = {k: v for k, v in metrics.items() if (step or 0) > done.get(k, -1)}
        if fresh:
            super().log_metrics(fresh, step)
