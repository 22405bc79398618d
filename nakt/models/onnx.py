"""``onnx:<path>``: an ONNX model run through onnxruntime, its input contract from a sidecar JSON.

`OnnxNet` makes an ``onnxruntime.InferenceSession`` look like a torch module, so `NaktModel` (padding, heads),
`nakt.inference.infer_probs` and sliding windows work on it unchanged. onnxruntime is an optional dependency
(``pip install "nakt[onnx]"``), imported only when an ONNX model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nakt.errors import NaktError
from nakt.models.registry import NaktModel, scheme
from nakt.models.torchscript import foreign_card

__all__ = ["OnnxNet", "load_onnx"]


def _onnxruntime(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise NaktError(None, f'onnx:{path} needs the onnx extra: pip install "nakt[onnx]"') from None
    return onnxruntime


class OnnxNet(nn.Module):
    """An ONNX file as a torch module: float ``[B, C_in, *spatial]`` -> its first output (e.g. logits
    ``[B, K, *spatial]`` or ``[B, K]``) as a float32 tensor on the input's device.

    CPU inputs run on onnxruntime's CPU provider; GPU inputs on its CUDA provider when installed (else the
    CPU one), on the input's own GPU (one session per device: under torchrun each process uses its GPU). Not
    differentiable: it is a teacher, never trained.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        # The weights live in the ONNX file. This empty parameter only carries a device, so `.to("cuda")` is
        # heard (inference reads the device of ``next(model.parameters())``) and picks the CUDA provider.
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        self._sessions: dict[str, object] = {}
        self._session(torch.device("cpu"))  # a broken file fails at load time, not at the first case

    def _session(self, device: torch.device):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if str(device) not in self._sessions:
            ort = _onnxruntime(self.path)
            providers: list = ["CPUExecutionProvider"]
            if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                # the provider's own default is GPU 0, whichever GPU the input is on
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index}))
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # share the cores as torch is told to
            options.log_severity_level = 3  # errors only; onnxruntime's warnings are not the user's business
            try:
                session = ort.InferenceSession(str(self.path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types for a bad file
                raise NaktError(self.path, f"cannot load ONNX model ({_first_line(exc)})") from None
            if len(session.get_inputs()) != 1:
                raise NaktError(self.path, f"the ONNX model takes {len(session.get_inputs())} inputs",
                                "nakt feeds one image tensor [B, C, *spatial]")
            self._sessions[str(device)] = session
        return self._sessions[str(device)]

    @property
    def input_shape(self) -> list:
        """The declared input shape: ints for fixed axes, names (or None) for dynamic ones."""
        return list(self._session(torch.device("cpu")).get_inputs()[0].shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self._session(x.device)
        feed = {session.get_inputs()[0].name: x.detach().float().cpu().contiguous().numpy()}
        try:
            out = session.run([session.get_outputs()[0].name], feed)[0]
        except Exception as exc:
            raise NaktError(self.path, f"onnxruntime rejected an input of shape {list(x.shape)} "
                            f"({_first_line(exc)})", f"the model declares input {self.input_shape}") from None
        return torch.from_numpy(out).float().to(x.device)

    def __getstate__(self) -> dict:
        # sessions cannot be pickled or deep-copied; a copy opens its own on first use
        return {**self.__dict__, "_sessions": {}}


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


@scheme("onnx", "load")
def load_onnx(path: str | Path, **contract) -> NaktModel:
    """Load an ONNX model. Its contract (``in_channels``, ``classes``, ``spatial_dims``, ``task``,
    ``label_values``, ``size``, ``patch``, ``normalization``, ``output``...) comes from `contract`, over
    ``<path>.json`` or ``<stem>.json`` beside the file, exactly as for ``torchscript:``.
    """
    path = Path(path)
    _onnxruntime(path)  # the missing extra is the first thing to say
    card = foreign_card(path, "onnx", "ONNX", **contract)
    net = OnnxNet(path)
    shape = net.input_shape
    if len(shape) != card.spatial_dims + 2:
        raise NaktError(path, f"the ONNX model takes {len(shape)}-D input, the contract says spatial_dims="
                        f"{card.spatial_dims} ({card.spatial_dims + 2}-D: [B, C, *spatial])")
    if isinstance(shape[1], int) and shape[1] != card.in_channels:
        raise NaktError(path, f"the ONNX model takes {shape[1]} channels, the contract says "
                        f"in_channels={card.in_channels}")
    return NaktModel(net, card)
