"""Choices made from the machine: the ISA level read from the CPU's flags and lowered by the caps a user sets for
PyTorch's kernels, the precision and memory layout taken from it, and the record a label set keeps of both."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nakt
from nakt.errors import NaktError
from nakt.inference import resolve_layout, resolve_precision
from nakt.io.images import read_mask
from nakt.machine import ISA_LEVELS, isa_level, this_machine

AVX2_ONLY = {"avx", "avx2", "fma", "sse4_2"}
BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16"}


@pytest.mark.parametrize("flags, env, level", [
    (AVX2_ONLY, {}, "avx2"),
    ({"avx", "sse4_2"}, {}, "default"),
    (BF16, {}, "avx512_bf16"),
    (BF16 | {"amx_tile", "amx_bf16"}, {}, "amx"),
    (AVX2_ONLY - {"fma"}, {}, "default"),  # AVX2 without FMA: oneDNN's AVX2 kernels need both
    (BF16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "avx2"),
    (BF16, {"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
    (BF16, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "avx512"),
    (AVX2_ONLY, {"ONEDNN_MAX_CPU_ISA": "ALL"}, "avx2"),  # a cap never raises the level
])
def test_isa_level_is_the_cpus_lowered_by_the_caps(flags, env, level):
    assert isa_level(flags, env) == level


def test_an_isa_cap_turns_automatic_bf16_off_in_a_fresh_process():
    """What `--precision auto` picks follows the capped level, so a CPU stood in for an AVX2-only one (and a user
    who caps oneDNN) gets fp32, not bf16 emulated in slow kernels."""
    script = ("import torch; from nakt.inference import resolve_precision; from nakt.machine import this_machine; "
              "print(this_machine().isa, resolve_precision('auto', torch.device('cpu')))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    shown = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    level, precision = shown.stdout.split()
    assert ISA_LEVELS.index(level) <= ISA_LEVELS.index("avx2") and precision == "fp32"


def test_layout_choice_follows_the_device_and_can_be_forced():
    cpu = torch.device("cpu")
    assert resolve_layout("auto", cpu, 2) == (this_machine().isa != "default")
    assert resolve_layout("auto", cpu, 3) is False and resolve_layout("channels-last", cpu, 3) is False
    assert resolve_layout("channels-last", cpu, 2) is True and resolve_layout("contiguous", cpu, 2) is False
    assert resolve_precision("fp32", cpu) == "fp32"


def test_label_set_records_its_machine_and_layout_and_both_layouts_agree(unet_teacher, synthetic2d, tmp_path):
    """Channels-last and contiguous inputs give the same labels (up to float rounding), the manifest says which
    ran and on what machine, and a label set is resumed only in the layout it was started in."""
    common = dict(teacher=[str(unet_teacher)], images=str(synthetic2d / "images"), precision="fp32",
                  cases=f"{synthetic2d / 'splits.json'}:transferal", progress=False)
    sets = {layout: nakt.label(**common, out=str(tmp_path / layout), layout=layout)
            for layout in ("channels-last", "contiguous")}
    same = total = 0
    for mask in sorted((sets["contiguous"] / "masks").iterdir()):
        a, b = read_mask(mask), read_mask(sets["channels-last"] / "masks" / mask.name)
        same, total = same + int((a == b).sum()), total + a.size
    assert total > 0 and same / total >= 0.999
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in sets.items()}
    assert manifests["channels-last"]["channels_last"] is True and manifests["contiguous"]["channels_last"] is False
    assert manifests["contiguous"]["machine"] == this_machine().kind()
    assert np.isfinite(len(manifests["contiguous"]["cases"])) and manifests["contiguous"]["cases"]
    with pytest.raises(NaktError, match="made with --layout contiguous, not with --layout channels-last"):
        nakt.label(**common, out=str(sets["contiguous"]), layout="channels-last")


def test_label_compile_gives_the_eager_labels_and_is_recorded(unet_teacher, synthetic2d, tmp_path, capfd):
    """``--compile`` runs the teacher through Inductor (a graph is compiled, its time printed), its labels agree
    with eager fp32 labels, the manifest records it, and a compiled set is not resumed eagerly."""
    common = dict(teacher=[str(unet_teacher)], images=str(synthetic2d / "images"), precision="fp32",
                  cases=f"{synthetic2d / 'splits.json'}:transferal", progress=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = nakt.label(**common, out=str(tmp_path / "compiled"), compile=True)
    # the network really went through Dynamo, as one graph: the short last batch (12 cases in blocks of 8) is
    # padded to the compiled size rather than compiled again
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert "nakt: compiled" in capfd.readouterr().err
    eager = nakt.label(**common, out=str(tmp_path / "eager"))
    same = total = 0
    for mask in sorted((eager / "masks").iterdir()):
        a, b = read_mask(mask), read_mask(compiled / "masks" / mask.name)
        same, total = same + int((a == b).sum()), total + a.size
    assert total > 0 and same / total >= 0.999
    assert json.loads((compiled / "manifest.json").read_text())["compile"] is True
    with pytest.raises(NaktError, match="made with --compile, not without --compile"):
        nakt.label(**common, out=str(compiled))


def test_a_compiled_graph_that_disagrees_with_eager_is_dropped(unet_teacher, synthetic2d, tmp_path, capfd,
                                                               monkeypatch):
    """A compiled graph is trusted only once its first batch agrees with the eager network: one that gives other
    probabilities (here a stand-in for a miscompiled graph: the logits negated) is dropped with a line, and the
    labels are the eager ones."""
    import nakt.batched

    def miscompile(model):
        net = model.net
        net._compiled_call_impl = lambda *args, **kwargs: -net.forward(*args, **kwargs)

    monkeypatch.setattr(nakt.batched, "compile_for_inference", miscompile)
    common = dict(teacher=[str(unet_teacher)], images=str(synthetic2d / "images"), precision="fp32",
                  cases=f"{synthetic2d / 'splits.json'}:transferal", progress=False, batch_size=4)
    compiled = nakt.label(**common, out=str(tmp_path / "compiled"), compile=True)
    assert "disagrees with the eager network" in capfd.readouterr().err
    eager = nakt.label(**common, out=str(tmp_path / "eager"))
    for mask in sorted((eager / "masks").iterdir()):
        np.testing.assert_array_equal(read_mask(mask), read_mask(compiled / "masks" / mask.name))
