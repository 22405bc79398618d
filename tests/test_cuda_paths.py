"""The CUDA-only branches of nakt, checked on the CPU: what each hands to torch, torch.distributed or onnxruntime
is recorded by stand-ins (no GPU is touched). tests/test_gpu.py runs the same paths on a real GPU when present."""

import types

import pytest
import torch

from nakt import sharding
from nakt.inference import resolve_precision
from nakt.models import onnx
from nakt.sharding import Share
from nakt.train import data as train_data


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_gpu_is_bf16_where_native_else_fp16(monkeypatch, native):
    """Before Ampere (V100, T4) bfloat16 is emulated: auto takes fp16 there (training then scales the loss)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp16")
    assert asked == [False]  # emulation does not count
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


@pytest.fixture
def fake_distributed(monkeypatch):
    """torch.distributed and torch.cuda stand-ins recording the calls `process_group` makes."""
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    return calls


def test_nccl_process_group_puts_each_rank_on_its_own_gpu(fake_distributed):
    """NCCL's object collectives and barriers use the current device: without set_device every rank would be on
    cuda:0 ("Duplicate GPU detected")."""
    with sharding.process_group(Share(2, 1, True, local_rank=1), "nccl", torch.device("cuda")):
        pass
    gpu = torch.device("cuda", 1)
    assert fake_distributed == [("set_device", gpu), ("init", "nccl", {"device_id": gpu}), ("destroy",)]
    fake_distributed.clear()
    with sharding.process_group(Share(2, 0, True, local_rank=0), "nccl", torch.device("cuda", 1)):
        pass  # an explicit GPU is kept
    assert fake_distributed[:2] == [("set_device", gpu), ("init", "nccl", {"device_id": gpu})]


def test_gloo_process_group_leaves_the_gpus_alone(fake_distributed):
    with sharding.process_group(Share(2, 1, True, local_rank=1)):
        pass
    assert fake_distributed == [("init", "gloo", {}), ("destroy",)]


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_collectives_use_the_gpu_under_nccl_only(monkeypatch, backend):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert sharding.collective_device() == (torch.device("cuda", 1) if backend == "nccl" else torch.device("cpu"))


def test_preparing_cases_under_nccl_reduces_a_tensor_on_the_collective_device(monkeypatch, tmp_path):
    """nccl rejects CPU tensors: the all_reduce that ends `fill_shared` must use `collective_device` (a meta
    tensor stands for the GPU one here)."""
    reduced = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: reduced.append(t.device))
    monkeypatch.setattr(train_data, "collective_device", lambda: torch.device("meta"))
    cases = train_data.DiskCases([], None, tmp_path / "prepared")
    monkeypatch.setattr(cases, "fill", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="meta"):  # a meta tensor has no value to read back, once reduced
        cases.fill_shared()
    assert reduced == [torch.device("meta")]


class _FakeSession:
    def __init__(self, path, options, providers):
        self.providers = providers

    def get_inputs(self):
        return [types.SimpleNamespace(name="x", shape=["B", 1, 32, 32])]


def test_onnx_teacher_runs_on_the_inputs_own_gpu(monkeypatch, tmp_path):
    """onnxruntime's CUDA provider defaults to GPU 0: the session of an input on cuda:1 must ask for device 1."""
    fake = types.SimpleNamespace(InferenceSession=_FakeSession, SessionOptions=types.SimpleNamespace,
                                 get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnx, "_onnxruntime", lambda path: fake)
    net = onnx.OnnxNet(tmp_path / "model.onnx")
    assert net._session(torch.device("cpu")).providers == ["CPUExecutionProvider"]
    for index in (0, 1):
        session = net._session(torch.device("cuda", index))
        assert session.providers == [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    assert sorted(net._sessions) == ["cpu", "cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert net._session(torch.device("cuda")) is net._sessions["cuda:1"]  # "cuda" is the current GPU
