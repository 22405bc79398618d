"""How far apart eager and compiled training gradients may be: one training step of a freshly built network, eager
and through ``torch.compile`` (Inductor), each against the same step in float64.

`nakt train --compile` keeps a compiled graph only if its first step agrees with the eager one
(`nakt.train.engine._agrees`); this measures the rounding that agreement has to allow on this machine: per
parameter tensor, the relative L2 distance of the fp32 gradient from the float64 one (the worst tensor, and
over all gradients together), for the eager step and the compiled one, and between the two. BatchNorm's backward
subtracts means, so fp32 gradients are less exact than fp32 outputs. ``--precision bf16`` takes both steps under
bf16 autocast (the check then measures them against an fp32 step, `nakt.train.engine._agrees`), and also reports
how far the logits are apart (largest difference relative to the reference's largest logit).

    python benchmarks/compile_gradients.py      # -> results/compile_gradients_<isa>.{json,md}
    python benchmarks/compile_gradients.py --precision bf16     # -> results/compile_gradients_<isa>_bf16.*
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from nakt.machine import this_machine
from nakt.models import ModelCard, build_model
from nakt.preprocess import one_hot
from nakt.train.losses import SoftDiceCELoss

ROOT = Path(__file__).resolve().parents[1]


def gradients(model: torch.nn.Module, forward, x: torch.Tensor, target: torch.Tensor,
              precision: str = "fp32") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits and every parameter's gradient after one forward (under bf16 autocast with `precision` bf16),
    soft Dice + cross-entropy loss and backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = forward(x).float()
    SoftDiceCELoss()(logits, target).backward()
    return logits.detach().double(), {name: p.grad.detach().double().clone() for name, p in model.named_parameters()}


def distance(step: tuple, reference: tuple) -> dict:
    """The worst tensor's relative L2 distance (with its name), the distance over all gradients together, and the
    logits' largest difference relative to the reference's largest logit."""
    (logits, grads), (reference_logits, reference) = step, reference
    per_tensor = {n: float((g - reference[n]).norm() / reference[n].norm()) for n, g in grads.items()
                  if reference[n].norm() > 0}
    worst = max(per_tensor, key=per_tensor.get)
    whole = float(torch.cat([(g - reference[n]).flatten() for n, g in grads.items()]).norm()
                  / torch.cat([r.flatten() for r in reference.values()]).norm())
    return {"worst_tensor": worst, "worst_relative_l2": per_tensor[worst], "all_relative_l2": whole,
            "logits_relative_max": float((logits - reference_logits).abs().max() / reference_logits.abs().max())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smp:Unet/resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the eager and compiled steps' arithmetic (the reference is float64)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    card = ModelCard(args.model, 1, 2, label_values=[0, 255], size=[args.size])
    model = build_model(card).to(memory_format=torch.channels_last).train()
    x = torch.randn(args.batch, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    target = one_hot((torch.rand(args.batch, args.size, args.size) > 0.7).long(), 2)
    exact = copy.deepcopy(model).double()  # before any step: the same weights and BatchNorm statistics
    buffers = [b.clone() for b in model.buffers()]
    eager = gradients(model, model, x, target, args.precision)
    for b, kept in zip(model.buffers(), buffers):  # the compiled step starts from the same statistics
        b.copy_(kept)
    compiled = gradients(model, torch.compile(model), x, target, args.precision)
    reference = gradients(exact, exact, x.double(), target.double())
    result = {"command": " ".join(["python", "benchmarks/compile_gradients.py", *(sys.argv[1:] if argv is None
                                                                                  else argv)]),
              "config": vars(args), "machine": this_machine().to_json(),
              "eager_vs_float64": distance(eager, reference), "compiled_vs_float64": distance(compiled, reference),
              "compiled_vs_eager": distance(compiled, eager), "total_wall_s": time.time() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"compile_gradients_{this_machine().isa}" + ("_bf16" if args.precision == "bf16" else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    lines = [f"# {args.precision} training gradients, eager and compiled, against float64 ({args.model}, {args.size} "
             f"px, batch {args.batch}; {result['machine']['cpu_model']}, ISA {result['machine']['isa']})", "",
             "| pair | worst tensor | its relative L2 | all gradients, relative L2 | logits, largest difference |",
             "| --- | --- | --- | --- | --- |"]
    for pair in ("eager_vs_float64", "compiled_vs_float64", "compiled_vs_eager"):
        d = result[pair]
        lines.append(f"| {pair.replace('_', ' ')} | {d['worst_tensor']} | {d['worst_relative_l2']:.4f} | "
                     f"{d['all_relative_l2']:.4f} | {d['logits_relative_max']:.4f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
