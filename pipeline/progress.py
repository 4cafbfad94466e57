"""Progress bars that say what they measure: ``sft · training``, ``sft · validating``, ``evaluate · dpo``.

Lightning's defaults read "Epoch 0/-2" (the chain counts steps, not epochs), "Validation" and "Testing" (eight
unlabelled bars in evaluate, one per variant) and show the logger's ``v_num``. Same bars, labelled.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StageBar(RichProgressBar):
    """Lightning's rich progress bar labelled with the stage and what it is doing (``label``)."""

    def __init__(self, stage: str, label: str | None = None):
        super().__init__()
        self.stage, self.label = stage, label

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.stage} · training"

    @property
    def validation_description(self) -> str:
        return f"{self.stage} · validating"

    @property
    def test_description(self) -> str:
        return f"{self.stage} · {self.label or 'testing'}"

    @property
    def predict_description(self) -> str:
        return f"{self.stage} · {self.label or 'predicting'}"

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
