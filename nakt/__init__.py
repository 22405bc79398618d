"""nakt: network-agnostic knowledge transfer for medical imaging.

Teachers of any architecture annotate a transferal set (`label`); a student of another architecture learns
from those annotations (`train`), is optionally fine-tuned on a small labelled set (`finetune`), and is
scored (`evaluate`) or applied (`predict`); `report` shows which labels of a label set to trust. Each function
takes an options dataclass or keyword arguments.
"""

from nakt.api import evaluate, export, export_nnunet, finetune, label, load, predict, report, train
from nakt.errors import NaktError
from nakt.version import __version__

__all__ = ["NaktError", "__version__", "evaluate", "export", "export_nnunet", "finetune", "label", "load", "predict",
           "report", "train"]
