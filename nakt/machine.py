"""What this machine computes fast, read once per process: the CPU's model and instruction-set flags (lowered
to the caps a user set for PyTorch's kernels: ``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``), its cores and
torch's threads, and the GPU with its compute capability. Inference and training choose precision and memory
layout from this record (`cpu_has_bf16`, `channels_last_pays`), and label sets and benchmarks store it
(`Machine.to_json`), so a result says which kind of machine made it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform

import torch

__all__ = ["FLAGS_OF_INTEREST", "ISA_LEVELS", "Machine", "channels_last_pays", "cpu_has_bf16", "isa_level",
           "this_machine"]

# From slowest to fastest; each level includes the ones before it.
ISA_LEVELS = ("default", "avx2", "avx512", "avx512_bf16", "amx")
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
# oneDNN's and ATen's ISA caps, read as one of ISA_LEVELS (oneDNN runs nakt's convolutions, ATen the rest)
_ONEDNN_CAPS = {"sse41": "default", "avx": "default", "avx2": "avx2", "avx2_vnni": "avx2",
                "avx2_vnni_2": "avx2", "avx512_core": "avx512", "avx512_core_vnni": "avx512",
                "avx512_core_bf16": "avx512_bf16", "avx512_core_fp16": "avx512_bf16", "avx512_core_amx": "amx",
                "avx512_core_amx_fp16": "amx", "all": "amx"}
_ATEN_CAPS = {"default": "default", "avx2": "avx2", "avx512": "amx"}  # ATen has no bf16 level: no cap above avx2


def isa_level(flags: set[str], env: dict[str, str] | None = None) -> str:
    """The fastest of `ISA_LEVELS` that the CPU `flags` provide and the caps in `env` allow.

    >>> isa_level({"avx2", "fma", "avx512f", "avx512_bf16"}, env={})
    'avx512_bf16'
    >>> isa_level({"avx2", "fma", "avx512f", "avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    'avx2'
    """
    env = os.environ if env is None else env
    if "amx_bf16" in flags:
        level = "amx"
    elif "avx512_bf16" in flags:
        level = "avx512_bf16"
    elif "avx512f" in flags:
        level = "avx512"
    elif {"avx2", "fma"} <= flags:
        level = "avx2"
    else:
        level = "default"
    caps = [_ONEDNN_CAPS.get(env.get("ONEDNN_MAX_CPU_ISA", "all").lower(), "amx"),
            _ATEN_CAPS.get(env.get("ATEN_CPU_CAPABILITY", "avx512").lower(), "amx")]
    return min([level, *caps], key=ISA_LEVELS.index)


@dataclasses.dataclass(frozen=True)
class Machine:
    """This process's machine: CPU model, the ISA flags nakt's choices depend on, the effective ISA level
    (`isa_level`), torch's CPU kernel level, cores and threads, and the GPU (name and compute capability) when
    there is one."""

    cpu_model: str
    cpu_flags: tuple[str, ...]
    isa: str
    torch_cpu_capability: str
    cores: int
    torch_threads: int
    gpu: str | None = None
    gpu_capability: tuple[int, int] | None = None

    def kind(self) -> dict:
        """What makes results differ between machines (stored in label sets): the CPU, its ISA level, the GPU."""
        return {"cpu_model": self.cpu_model, "isa": self.isa, "gpu": self.gpu}

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "cpu_flags": list(self.cpu_flags), "platform": platform.platform(),
                "torch": torch.__version__}


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:  # the first core's lines: every core of a machine is the same model
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: flags unknown, so the CPU is taken for the plainest kind
        pass
    return model, flags


@functools.cache
def this_machine() -> Machine:
    """The `Machine` this process runs on (read once)."""
    model, flags = _cpuinfo()
    gpu = capability = None
    if torch.cuda.is_available():
        gpu, capability = torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())
    return Machine(cpu_model=model, cpu_flags=tuple(f for f in FLAGS_OF_INTEREST if f in flags),
                   isa=isa_level(flags), torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   cores=os.cpu_count() or 1, torch_threads=torch.get_num_threads(), gpu=gpu,
                   gpu_capability=capability)


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16, or AMX tiles on Sapphire Rapids and later)
    and no ISA cap hides it."""
    return ISA_LEVELS.index(this_machine().isa) >= ISA_LEVELS.index("avx512_bf16")


def channels_last_pays(device: torch.device, spatial_dims: int) -> bool:
    """NHWC for 2D inference on GPUs and on CPUs with AVX2 or better: oneDNN's and cuDNN's fast convolutions
    want it (2D U-Net/FPN/SegResNet at 256 px, batch 8, fp32: 1.3-1.4x faster than NCHW both on AVX-512 and
    with the ISA capped to AVX2; benchmarks/throughput.py measures the whole pipeline). Without AVX2 oneDNN
    falls back to its reference kernels, where NCHW is the safe choice."""
    if spatial_dims != 2:
        return False
    return device.type == "cuda" or (device.type == "cpu" and this_machine().isa != "default")
