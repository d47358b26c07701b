"""SINGD in bfloat16 on the digits CNN and ViT: convolutions and attention projections
preconditioned, against SINGD restricted to the Linear layers and against Adam (all in bfloat16).

Each run trains the model (parameters and SINGD's roots in bfloat16, loss in float32) for
``--steps`` steps of batch 64 drawn with one seeded generator, and reports the final test loss
and accuracy and whether every parameter stayed finite. Variants:

* ``singd_all``: SINGD on every Linear, Conv2d and attention projection;
* ``singd_linear_only``: the same with the convolutions / attention projections skipped
  (``skip=``), the state before this extension;
* ``adam``: ``torch.optim.Adam`` (lr 1e-3 CNN, 2e-3 ViT) on the bfloat16 parameters.

    python benchmarks/singd_bf16.py [--quick] [--seeds 2] [--out result.json]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from thermo_kfac.data import load_dataset
from thermo_kfac.models import build_model
from thermo_kfac.singd import SINGD

from _report import emit

SINGD_LR = {"cnn": 0.01, "vit": 0.01}  # lr 0.03 diverges on the CNN (bf16, 400 steps)
ADAM_LR = {"cnn": 1e-3, "vit": 2e-3}
SKIP = {"cnn": [r"^features\."], "vit": [r"in_proj", r"out_proj"]}


def run(model_name: str, variant: str, steps: int, seed: int) -> dict[str, Any]:
    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model(model_name, data).to(torch.bfloat16)
    if variant == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR[model_name])
    else:
        opt = SINGD(model, lr=SINGD_LR[model_name], momentum=0.9, damping=1e-2, T=5, beta1=0.01,
                    alpha1=0.5, dtype=torch.bfloat16,
                    skip=SKIP[model_name] if variant == "singd_linear_only" else ())
    x, y = data.x_train.to(torch.bfloat16), data.y_train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]).float(), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        logits = model(data.x_test.to(torch.bfloat16)).float()
    return {"test_loss": float(F.cross_entropy(logits, data.y_test)),
            "test_accuracy": float((logits.argmax(1) == data.y_test).float().mean()),
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            "preconditioned_layers": list(opt.layers) if isinstance(opt, SINGD) else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 steps, one seed")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    steps, seeds = (60, 1) if args.quick else (args.steps, args.seeds)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for model_name in ("cnn", "vit"):
        for variant in ("singd_all", "singd_linear_only", "adam"):
            runs = [run(model_name, variant, steps, seed) for seed in range(seeds)]
            results[f"{model_name}/{variant}"] = {
                "test_loss": [r["test_loss"] for r in runs],
                "test_accuracy": [r["test_accuracy"] for r in runs],
                "finite": all(r["finite"] for r in runs),
                "preconditioned_layers": len(runs[0]["preconditioned_layers"])}
    emit({"script": "benchmarks/singd_bf16.py", "steps": steps, "seeds": seeds, "batch": 64,
          "dtype": "bfloat16", "results": results}, args.out)


if __name__ == "__main__":
    main()
