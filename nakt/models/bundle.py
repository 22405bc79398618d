"""``bundle:<folder>[?labels=0,1]``: a MONAI bundle as a teacher, run through its own inference config.

The bundle's ``configs/inference.json`` (or ``.yaml``) is parsed with `monai.bundle.ConfigParser`; nakt uses
its ``preprocessing`` (on the case's file path, as the bundle's own data loader would), ``network_def`` with
the weights ``models/model.pt``, its ``inferer``, and its ``postprocessing`` up to but excluding the first
discretising transform (``AsDiscreted``, saving, connected components...): activations and ``Invertd`` run,
so the probabilities lie on the grid the bundle's ``LoadImaged`` read. Without an ``Invertd`` there, nakt
inverts the preprocessing itself; without an activation, it applies softmax (sigmoid for one channel).

Label values and class names come from the metadata's ``network_data_format.outputs.pred.channel_def``
(``{"0": "background", "1": "spleen"}``), or from ``?labels=0,1`` in the spec.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.io.dataset import Case
from nakt.io.images import Image
from nakt.models.card import ModelCard
from nakt.models.registry import scheme

__all__ = ["BundleTeacher", "load_bundle_teacher"]

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# postprocessing transforms from which on the output is no longer probabilities (or is written somewhere)
DISCRETISING = ("AsDiscrete", "Save", "KeepLargestConnectedComponent", "LabelFilter", "FillHoles",
                "RemoveSmallObjects", "LabelToContour", "VoteEnsemble", "DistanceTransformEDT")


def _parse_rest(rest: str) -> tuple[Path, list[int] | None]:
    """``"DIR?labels=0,1"`` -> ``(DIR, [0, 1])``."""
    folder, _, query = rest.partition("?")
    options = parse_qs(query)
    unknown = sorted(set(options) - {"labels"})
    if unknown:
        raise NaktError(f"bundle:{rest}", f"unknown option {unknown[0]!r}", "valid: labels (e.g. ?labels=0,1)")
    labels = None
    if "labels" in options:
        try:
            labels = [int(v) for v in options["labels"][-1].split(",")]
        except ValueError:
            raise NaktError(f"bundle:{rest}", "labels must be whole numbers, e.g. ?labels=0,255") from None
    return Path(folder), labels


def _channel_def(meta: dict) -> dict | None:
    outputs = meta.get("network_data_format", {}).get("outputs", {})
    pred = outputs.get("pred") or next(iter(outputs.values()), None) if isinstance(outputs, dict) else None
    return pred.get("channel_def") if isinstance(pred, dict) else None


class BundleTeacher:
    """A MONAI bundle run on one case at a time; `weights` is the weights file (for checksums). It reads its
    files itself and maps its output onto any grid nakt reads, so it needs no orientation (None)."""

    orientation: str | None = None

    def __init__(self, spec: str, folder: Path, labels: list[int] | None, device: torch.device):
        from monai.bundle import ConfigParser

        self.spec, self.folder, self.device = spec, folder, device
        if not folder.is_dir():
            raise NaktError(folder, "MONAI bundle folder not found")
        configs = [folder / "configs" / name for name in CONFIG_NAMES if (folder / "configs" / name).is_file()]
        if not configs:
            raise NaktError(folder / "configs", "bundle has no inference config",
                            f"expected one of {', '.join(CONFIG_NAMES)}")
        self.weights = folder / "models" / "model.pt"
        if not self.weights.is_file():
            raise NaktError(self.weights, "bundle has no weights file",
                            "a TorchScript-only bundle loads as torchscript:models/model.ts")
        parser = ConfigParser()
        try:
            parser.read_config(str(configs[0]))
            if (folder / "configs" / "metadata.json").is_file():
                parser.read_meta(str(folder / "configs" / "metadata.json"))
        except Exception as exc:
            raise NaktError(configs[0], f"cannot read bundle config ({type(exc).__name__}: {exc})") from None
        parser["bundle_root"] = str(folder)  # configs find their files relative to it
        for key in ("network_def", "preprocessing"):
            if key not in parser:
                raise NaktError(configs[0], f"missing key {key!r}", "nakt runs the bundle's own preprocessing "
                                "and network_def")
        meta = parser.get("_meta_", {}) or {}
        channel_def = _channel_def(meta)
        if labels is None:
            if not channel_def:
                raise NaktError(folder / "configs" / "metadata.json",
                                "missing key 'network_data_format.outputs.pred.channel_def'",
                                f"name the label values in the spec: bundle:{folder}?labels=0,1")
            order = sorted(channel_def, key=int)
            labels, names = [int(k) for k in order], [str(channel_def[k]) for k in order]
        else:
            names = [str(channel_def.get(str(v), v)) for v in labels] if channel_def else []
        self.parser, self.config = parser, configs[0]
        inputs = meta.get("network_data_format", {}).get("inputs", {}) or {"image": {}}
        self.key = next(iter(inputs))
        first = inputs[self.key] if isinstance(inputs[self.key], dict) else {}
        spatial_dims = (len(first["spatial_shape"]) if first.get("spatial_shape")
                        else self._parsed("network_def#spatial_dims", None))
        if spatial_dims is None:
            raise NaktError(configs[0], "missing key 'network_def#spatial_dims' (nor a spatial_shape in metadata)")
        self.card = ModelCard(spec, in_channels=int(first.get("num_channels", 1)), classes=len(labels),
                              spatial_dims=int(spatial_dims), label_values=labels, class_names=names,
                              output="probs")
        self.net = self._network()
        self.preprocessing = self._parsed("preprocessing")
        self.inferer = self._parsed("inferer", None)
        self.postprocessing = self._parsed("postprocessing", None)

    def _parsed(self, key: str, default: object = ...) -> object:
        if key not in self.parser and default is not ...:
            return default
        try:
            return self.parser.get_parsed_content(key, instantiate=True)
        except Exception as exc:
            raise NaktError(self.config, f"cannot build {key!r} ({type(exc).__name__}: {exc})") from None

    def _network(self) -> torch.nn.Module:
        net = self._parsed("network_def")
        try:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise NaktError(self.weights, f"cannot load weights ({type(exc).__name__})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a CheckpointSaver file
            state = state["model"]
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise NaktError(self.weights, "weights do not fit the bundle's network_def",
                            str(exc).splitlines()[0]) from None
        return net.to(self.device).eval()

    @torch.no_grad()
    def storage_probs(self, case: Case) -> np.ndarray:
        """Probabilities ``[C, *grid]`` on the grid the bundle's ``LoadImaged`` reads: (i, j, k) for volumes,
        (x, y) = (columns, rows) for 2D files."""
        from monai.data import decollate_batch
        from monai.inferers import SimpleInferer
        from monai.transforms import Invertd

        source = [str(p) for p in case.images]
        data = self.preprocessing({self.key: source[0] if len(source) == 1 else source})
        x = data[self.key][None].to(self.device)  # [1, C_in, *spatial]
        pred = (self.inferer or SimpleInferer())(x, self.net)
        data["pred"] = decollate_batch(pred.detach().cpu())[0]  # [C, *spatial], carrying the input's metadata
        activated = inverted = False
        for transform in getattr(self.postprocessing, "transforms", []):
            name = type(transform).__name__
            if any(name.startswith(stop) for stop in DISCRETISING):
                break
            data = transform(data)
            activated |= name.startswith("Activations")
            inverted |= name.startswith("Invert")
        if not inverted:  # back onto the loaded grid, undoing crops, resizes, spacing and orientation
            data = Invertd("pred", self.preprocessing, orig_keys=self.key, nearest_interp=False)(data)
        probs = torch.as_tensor(data["pred"]).float()
        if not activated:
            probs = torch.sigmoid(probs) if probs.shape[0] == 1 else torch.softmax(probs, 0)
        if probs.shape[0] == 1 and self.card.classes == 2:  # one sigmoid channel: P(foreground)
            probs = torch.cat([1 - probs, probs])
        if probs.shape[0] != self.card.classes:
            raise NaktError(self.spec, f"outputs {probs.shape[0]} channels for {self.card.classes} label values "
                            f"{self.card.label_values}", "fix channel_def in metadata.json, or ?labels=...")
        return probs.numpy()

    def case_probs(self, case: Case, image: Image) -> np.ndarray:
        """Probabilities ``[C, *image.spatial_shape]`` on nakt's array grid of `image`."""
        probs = self.storage_probs(case)
        if probs.ndim == 3:  # 2D: MONAI's (x, y) = (columns, rows) -> nakt's (rows, columns)
            probs = probs.transpose(0, 2, 1)
        elif image.ornt is not None:  # 3D: storage (i, j, k) -> nakt's reoriented axes
            import nibabel.orientations as nio

            probs = np.moveaxis(nio.apply_orientation(np.moveaxis(probs, 0, -1), image.ornt), -1, 0)
        if probs.shape[1:] != image.spatial_shape:
            raise NaktError(self.spec, f"output grid {probs.shape[1:]} differs from {case.name}'s "
                            f"{image.spatial_shape}", "its preprocessing cannot be inverted")
        return np.ascontiguousarray(probs, dtype=np.float32)


@scheme("bundle", "teacher")
def load_bundle_teacher(rest: str, spec: str, device: torch.device) -> BundleTeacher:
    """``bundle:DIR[?labels=0,1]`` -> a `BundleTeacher` on `device`."""
    folder, labels = _parse_rest(rest)
    return BundleTeacher(spec, folder, labels, device)
