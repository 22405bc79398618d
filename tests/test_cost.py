"""What a model costs per case (`nakt.cost`, ``nakt evaluate --cost``): parameters, FLOPs and latency."""

import json
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import nakt
from nakt.cost import case_cost
from nakt.io.dataset import discover_cases
from nakt.teachers import load_teacher


def test_evaluate_cost_counts_the_networks_weights_and_flops_and_times_both_runtimes(synthetic2d, unet_teacher,
                                                                                     tmp_path):
    """Parameters and FLOPs equal what the test counts itself on one forward pass of the network at its input
    size (48 px inputs are resized to the card's 32); latency measured in PyTorch and ONNX Runtime."""
    data = synthetic2d
    summary = nakt.evaluate(model=str(unet_teacher), images=str(data / "images"), masks=str(data / "masks"),
                            cases=f"{data / 'splits.json'}:test", out=str(tmp_path / "eval"), cost=True,
                            hd95=False, progress=False)
    cost = summary["cost"]
    model = nakt.load(str(unet_teacher))
    with FlopCounterMode(display=False) as counter:
        model.predict_proba(torch.zeros(1, model.card.in_channels, 32, 32))
    assert counter.get_total_flops() > 1e6
    assert cost["flops"] == counter.get_total_flops()
    assert cost["parameters"] == sum(p.numel() for p in model.parameters())
    assert cost["latency_ms"] > 0 and cost["onnx_latency_ms"] > 0
    assert cost["machine"]["cpu_model"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["cost"]["flops"] == cost["flops"]


def test_an_ensemble_costs_the_sum_of_its_teachers(synthetic2d, unet_teacher):
    case = discover_cases(str(synthetic2d / "images"))[0]
    one = case_cost([load_teacher(str(unet_teacher))], case, repeats=1)
    two = case_cost([load_teacher(str(unet_teacher)), load_teacher(str(unet_teacher))], case, repeats=1)
    assert two.flops == 2 * one.flops and two.parameters == 2 * one.parameters


def test_cost_of_predictions_on_disk_is_refused_in_one_line(synthetic2d, tmp_path):
    data = synthetic2d
    result = subprocess.run([sys.executable, "-m", "nakt", "evaluate", "--pred", str(data / "masks"), "--images",
                             str(data / "images"), "--masks", str(data / "masks"), "--out", str(tmp_path / "e"),
                             "--cost"], capture_output=True, text=True)
    assert result.returncode == 2 and "--cost measures a model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
