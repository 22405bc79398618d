"""Classification: labels, KD losses, metrics, robustness, targeted transfer and RoS-KD.

The pipeline verbs (`nakt.train`, `label`, `predict`, `evaluate`) dispatch here for classification runs.
"""

from nakt.classify.losses import kd_loss
from nakt.classify.metrics import classification_scores

__all__ = ["kd_loss", "classification_scores"]
