"""``nnunet:<trained model folder>``: an nnU-Net v2 model as a teacher, run by nnU-Net's own predictor.

The folder is what ``nnUNetv2_train`` writes (``plans.json``, ``dataset.json``, ``fold_<k>/checkpoint_final.pth``).
Options go in a query: ``nnunet:DIR?folds=0,1&checkpoint=checkpoint_best.pth&tta=0&trust=1``.

- ``folds``: comma-separated fold numbers or ``all`` (default: every ``fold_<k>`` holding the checkpoint, as
  ``nnUNetv2_predict`` does); nnU-Net averages the folds' logits.
- ``checkpoint``: file name in each fold folder (default ``checkpoint_final.pth``).
- ``tta``: ``0`` disables mirroring (nnU-Net's ``--disable_tta``); default on.
- ``trust``: ``1`` unpickles the checkpoints without restriction and lets plans.json name any network class.

Each case's files are read by the reader/writer class the plans name, exactly as ``nnUNetv2_predict`` reads them,
and predicted with ``nnUNetPredictor`` (its preprocessing, resampling, sliding window, mirroring), so the
probabilities equal nnU-Net's own; `nnunet_probs_to_grid` then puts them on nakt's grid for the image.

Nothing in the folder runs as code without ``trust=1``: checkpoints are read with the allow-list of
`nakt.models.safe_checkpoint` and the predictor is initialized from those dicts (nnU-Net's own
``initialize_from_trained_model_folder`` unpickles with ``weights_only=False``), and the network and layer
classes plans.json names must come from ``dynamic_network_architectures`` and ``torch.nn``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.io.dataset import Case
from nakt.io.images import Image
from nakt.io.rundir import read_json
from nakt.models.card import ModelCard
from nakt.models.registry import scheme
from nakt.models.safe_checkpoint import NNUNET_GLOBALS, TRUST_HINT, load_checkpoint

__all__ = ["NnunetTeacher", "load_nnunet_teacher", "nnunet_probs_to_grid", "parse_nnunet_spec", "trusted_spec"]

OPTIONS = ("folds", "checkpoint", "tta", "trust")
# readers whose arrays are the file's storage order transposed to SimpleITK's (z, y, x), or natural 2D images
PLAIN_READERS = ("SimpleITKIO", "NibabelIO", "NaturalImage2DIO")
# reader that first reorients a NIfTI to its closest canonical (RAS) axes
REORIENTING_READER = "NibabelIOWithReorient"
# the modules plans.json may name for the network and its layers without trust (pydoc.locate imports anything)
SAFE_NETWORK_PREFIXES = ("dynamic_network_architectures.",)
SAFE_LAYER_PREFIXES = ("torch.nn.",)


def _needs_nnunet(spec: str):
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise NaktError(spec, 'needs the nnunet extra: pip install "nakt[nnunet]"') from None


def parse_nnunet_spec(rest: str) -> tuple[Path, dict]:
    """``"DIR?folds=0,1&tta=0"`` -> ``(Path("DIR"), {"folds": [0, 1], "checkpoint": ..., "tta": False, ...})``.

    >>> parse_nnunet_spec("m?folds=0,2&tta=0")[1]
    {'folds': [0, 2], 'checkpoint': 'checkpoint_final.pth', 'tta': False, 'trust': False}
    """
    folder, _, query = rest.partition("?")
    options = {"folds": None, "checkpoint": "checkpoint_final.pth", "tta": True, "trust": False}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        if key not in OPTIONS:
            raise NaktError(None, f"unknown nnunet option {key!r} in {rest!r}", f"valid: {', '.join(OPTIONS)}")
        if key == "folds":
            items = [f.strip() for f in value.split(",") if f.strip()]
            if not items or not all(f == "all" or f.isdigit() for f in items):
                raise NaktError(None, f"folds={value!r}: expected fold numbers such as 0,1 or 'all'")
            options["folds"] = [f if f == "all" else int(f) for f in items]
        elif key == "checkpoint":
            if not value or "/" in value or "\\" in value:
                raise NaktError(None, f"checkpoint={value!r}: expected a file name such as checkpoint_best.pth")
            options["checkpoint"] = value
        else:
            if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise NaktError(None, f"{key}={value!r}: expected 0 or 1")
            options[key] = value.lower() in ("1", "true", "yes")
    return Path(folder), options


def trusted_spec(spec: str) -> str:
    """`spec` with ``trust=1`` added to its query (what ``--trust-checkpoint`` does to ``nnunet:`` specs).

    >>> trusted_spec("nnunet:m?folds=0")
    'nnunet:m?folds=0&trust=1'
    """
    base, _, query = spec.partition("?")
    pairs = [(k, v) for k, vs in parse_qs(query, keep_blank_values=True).items() for v in vs if k != "trust"]
    return f"{base}?{urlencode(pairs + [('trust', '1')], safe=',')}"


def _fold_checkpoints(folder: Path, folds: list | None, checkpoint: str) -> dict:
    """{fold: checkpoint path}; with `folds` None, every ``fold_<k>`` holding `checkpoint` (or ``fold_all``)."""
    if folds is None:
        found = sorted(int(p.name[5:]) for p in folder.glob("fold_*")
                       if p.name[5:].isdigit() and (p / checkpoint).is_file())
        folds = found or (["all"] if (folder / "fold_all" / checkpoint).is_file() else [])
        if not folds:
            raise NaktError(folder / "fold_0" / checkpoint, "not found (no fold_<k> folder holds it)",
                            "a folder nnUNetv2_train wrote? pass ?checkpoint=checkpoint_best.pth for another file")
    paths = {f: folder / f"fold_{f}" / checkpoint for f in folds}
    for path in paths.values():
        if not path.is_file():
            have = sorted(p.parent.name for p in folder.glob(f"fold_*/{checkpoint}"))
            raise NaktError(path, "not found", f"folders holding {checkpoint}: {', '.join(have) or 'none'}")
    return paths


_FOLDER_HINT = "an nnU-Net trained model folder holds plans.json and dataset.json"


def _check_network_classes(plans_path: Path, configuration_manager) -> None:
    """Refuse plans.json naming a network or layer class outside the known packages: nnU-Net imports and calls
    whatever it names, so a crafted plans.json is as dangerous as a crafted pickle."""
    names = [("network", configuration_manager.network_arch_class_name, SAFE_NETWORK_PREFIXES)]
    kwargs = configuration_manager.network_arch_init_kwargs
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if kwargs.get(key) is not None:
            names.append((key, kwargs[key], SAFE_LAYER_PREFIXES))
    for what, name, prefixes in names:
        if not str(name).startswith(prefixes):
            raise NaktError(plans_path, f"refused: {what} class {name!r} is outside {', '.join(prefixes)}",
                            TRUST_HINT)


class NnunetTeacher:
    """An nnU-Net trained model folder run by ``nnUNetPredictor``; `case_probs` gives ``[C, *image.spatial_shape]``.
    It reads the case files itself and maps its output onto any grid nakt reads, so it needs no orientation."""

    orientation = None

    def __init__(self, spec: str, predictor, card: ModelCard, folder: Path):
        self.spec, self.predictor, self.card, self.folder = spec, predictor, card, folder
        self.reader_name = predictor.plans_manager.plans["image_reader_writer"]

    def nnunet_probs(self, files: list[Path]) -> np.ndarray:
        """nnU-Net's probabilities for one case's channel files, in nnU-Net's array order (as its
        ``--save_probabilities`` .npz holds them): ``[C, z, y, x]``, or ``[C, 1, H, W]`` for 2D."""
        reader = self.predictor.plans_manager.image_reader_writer_class()
        try:
            data, properties = reader.read_images([str(f) for f in files])
        except Exception as exc:  # nnU-Net readers assert and raise RuntimeError without a message
            raise NaktError(files[0], f"nnU-Net's {type(reader).__name__} cannot read it "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})",
                            f"this model reads {self.predictor.dataset_json.get('file_ending', '?')} files") from None
        if data.shape[0] != self.card.in_channels:
            raise NaktError(files[0], f"{data.shape[0]} channel(s), the nnU-Net model expects {self.card.in_channels}",
                            "a case lists its channel files in nnU-Net's _0000, _0001... order")
        # nnU-Net prints progress notes; nakt's output stays one line per problem
        with contextlib.redirect_stdout(io.StringIO()):
            _, probs = self.predictor.predict_single_npy_array(data, properties, None, None, True)
        return np.asarray(probs, dtype=np.float32)

    def case_probs(self, case: Case, image: Image) -> np.ndarray:
        return nnunet_probs_to_grid(self.nnunet_probs(case.images), image, self.reader_name)


def nnunet_probs_to_grid(probs: np.ndarray, image: Image, reader: str = "SimpleITKIO") -> np.ndarray:
    """nnU-Net probabilities ``[C, *nnU-Net's spatial]`` -> ``[C, *image.spatial_shape]`` on nakt's grid for `image`.

    `probs` is what nnU-Net returns for the image's files (or its ``--save_probabilities`` .npz key
    ``probabilities``), read by the reader/writer class named `reader` (plans.json ``image_reader_writer``):

    - 2D: ``[C, 1, H, W]``, rows and columns as nakt reads a 2D file (PNG: as displayed; 2D MHA/NIfTI: (y, x)).
    - 3D, SimpleITK order ``[C, z, y, x]`` = storage (k, j, i) (``SimpleITKIO``, ``NibabelIO``): transposed to
      storage (i, j, k), then reoriented by ``image.ornt`` like nakt's array.
    - 3D, ``NibabelIOWithReorient``: (z, y, x) of the file reoriented to its closest RAS axes, first turned
      back to storage order.
    """
    probs = np.asarray(probs, dtype=np.float32)
    spatial = image.spatial_shape
    if len(spatial) == 2:
        if probs.ndim != 4 or probs.shape[1] != 1:
            raise NaktError(image.path, f"nnU-Net probabilities of shape {probs.shape} for a 2D image",
                            "expected [C, 1, H, W]")
        out = probs[:, 0]
    else:
        if probs.ndim != 4:
            raise NaktError(image.path, f"nnU-Net probabilities of shape {probs.shape} for a 3D image",
                            "expected [C, z, y, x]")
        import nibabel.orientations as nio

        out = probs.transpose(0, 3, 2, 1)  # (z, y, x) -> (x, y, z)
        if reader == REORIENTING_READER:
            if image.kind != "nifti":
                raise NaktError(image.path, f"{REORIENTING_READER} probabilities need a NIfTI image")
            # nnU-Net applied io_orientation(affine) (storage -> closest RAS); undo it to get storage order
            to_ras = nio.io_orientation(image.meta["affine"])
            identity = np.column_stack([np.arange(3), np.ones(3)])
            out = _apply_ornt(out, nio.ornt_transform(identity, to_ras))
        elif reader not in PLAIN_READERS:
            raise NaktError(image.path, f"nnU-Net reader/writer {reader!r} is not supported by nakt",
                            f"supported: {', '.join(PLAIN_READERS + (REORIENTING_READER,))}")
        if image.ornt is not None:
            out = _apply_ornt(out, image.ornt)  # storage (i, j, k) -> nakt's reoriented array axes
    if out.shape[1:] != spatial:
        raise NaktError(image.path, f"nnU-Net probabilities cover {out.shape[1:]}, the image is {spatial}",
                        "predicted for another file?")
    return np.ascontiguousarray(out)


def _apply_ornt(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the spatial axes of ``[C, *spatial]``."""
    import nibabel.orientations as nio

    return np.moveaxis(nio.apply_orientation(np.moveaxis(arr, 0, -1), ornt), -1, 0)


@scheme("nnunet", "teacher")
def load_nnunet_teacher(rest: str, spec: str, device: torch.device) -> NnunetTeacher:
    """Build the teacher for ``nnunet:<rest>``: read the folder, load the checkpoints safely, set up the
    predictor on `device` (``perform_everything_on_device`` only on CUDA)."""
    _needs_nnunet(spec)
    folder, options = parse_nnunet_spec(rest)
    if not folder.is_dir():
        raise NaktError(folder, "nnU-Net model folder not found")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = read_json(folder / "dataset.json", _FOLDER_HINT)
    plans = read_json(folder / "plans.json", _FOLDER_HINT)
    checkpoints = _fold_checkpoints(folder, options["folds"], options["checkpoint"])
    loaded = {f: load_checkpoint(p, NNUNET_GLOBALS, options["trust"]) for f, p in checkpoints.items()}
    first_path, first = checkpoints[next(iter(loaded))], next(iter(loaded.values()))
    try:
        trainer_name = first["trainer_name"]
        configuration = first["init_args"]["configuration"]
        parameters = [ck["network_weights"] for ck in loaded.values()]
    except (KeyError, TypeError) as exc:
        raise NaktError(first_path, f"not an nnU-Net checkpoint (no {exc})", "written by nnUNetv2_train?") from None
    mirroring_axes = first.get("inference_allowed_mirroring_axes")

    plans_manager = PlansManager(plans)
    if configuration not in plans.get("configurations", {}):
        raise NaktError(folder / "plans.json", f"has no configuration {configuration!r} (the checkpoint's)")
    configuration_manager = plans_manager.get_configuration(configuration)
    if configuration_manager.previous_stage_name is not None:
        raise NaktError(folder, f"configuration {configuration!r} is a cascade stage (it needs the previous "
                        "stage's segmentation)", "use a 2d or 3d_fullres model")
    if not options["trust"]:
        _check_network_classes(folder / "plans.json", configuration_manager)
    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise NaktError(folder / "dataset.json", "region-based nnU-Net training (labels given as lists) is not "
                        "supported", "its outputs overlap, nakt teachers give one class per pixel")

    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except Exception:  # nnU-Net raises a bare RuntimeError with a paragraph of advice
        trainer_class = None
    if trainer_class is None:
        raise NaktError(first_path, f"trainer class {trainer_name!r} is not in the installed nnunetv2",
                        "install the package defining it, or set nnUNet_extTrainer")
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = label_manager.num_segmentation_heads
    # the same call nnU-Net's initialize_from_trained_model_folder makes (new and old signature)
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                                           num_outputs, enable_deep_supervision=False)
    else:
        network = trainer_class.build_network_architecture(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, num_inputs, num_outputs,
            enable_deep_supervision=False)
    try:
        network.load_state_dict(parameters[0])
    except RuntimeError as exc:
        raise NaktError(first_path, f"weights do not fit the network plans.json describes "
                        f"({str(exc).strip().splitlines()[0]})") from None

    with contextlib.redirect_stdout(io.StringIO()):  # the predictor prints a note on CPU devices
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=options["tta"],
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                        trainer_name, mirroring_axes)
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    values = [int(v) for v in label_manager.all_labels]
    original = dataset_json.get("nakt_label_values")  # written by nakt export-nnunet: index -> the label set's value
    card = ModelCard(spec=spec, in_channels=len(channels), classes=len(values),
                     spatial_dims=len(configuration_manager.patch_size), task="segmentation",
                     label_values=[int(v) for v in original] if original and len(original) == len(values) else values,
                     normalization="none", output="probs", class_names=_class_names(dataset_json, values))
    return NnunetTeacher(spec, predictor, card, folder)


def _class_names(dataset_json: dict, values: list[int]) -> list[str]:
    """dataset.json's label names in channel (value) order."""
    by_value = {int(v): name for name, v in dataset_json.get("labels", {}).items() if not isinstance(v, list)}
    return [by_value.get(int(v), str(v)) for v in values]
