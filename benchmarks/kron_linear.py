"""KronLinear on digits: a Kronecker-factored MLP trained by K-FAC (factors of A and B) vs Adam and
SGD, and a KronA adapter fine-tuning a frozen pretrained layer.

``kron_mlp``: 64 -> KronLinear((8, 8), (16, 8)) -> ReLU -> KronLinear((8, 8), (16, 16)) -> ReLU ->
Linear(128, 10) (2.9k weights where the dense MLP has 25k). ``adapter``: the dense MLP 64-128-10 is
trained by Adam on the even digits only; then its first layer is frozen and wrapped in a
KronLinear adapter (A (8, 8), B (16, 8), B = 0 at the start), the head stays trainable, and the
model is trained on all digits. Each run: ``--steps`` steps of batch 128 drawn from one seeded
generator; final test loss and accuracy.

    python benchmarks/kron_linear.py [--quick] [--steps 600] [--seeds 2] [--out result.json]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac.data import load_dataset
from thermo_kfac.models import KronLinear

from _report import emit


def kron_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), KronLinear((8, 8), (16, 8)), nn.ReLU(),
                         KronLinear((8, 8), (16, 16)), nn.ReLU(), nn.Linear(128, 10))


def adapter_model(data: Any, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(dense.parameters(), lr=3e-3)
    even = data.y_train % 2 == 0
    x, y = data.x_train[even], data.y_train[even]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(dense(x[idx]), y[idx]).backward()
        opt.step()
    return nn.Sequential(nn.Flatten(), KronLinear((8, 8), (16, 8), base=dense[1]), nn.ReLU(), dense[3])


def train(model: nn.Module, data: Any, optimizer: str, steps: int, seed: int) -> dict[str, float]:
    precond = None
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                                      lr=3e-3)
    else:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1 if optimizer == "sgd"
                              else 0.3, momentum=0.9)
        if optimizer == "kfac":
            precond = KFACPreconditioner(model, loss="cross_entropy", optimizer=opt, damping=0.1,
                                         kl_clip=1e-3, factor_update_every=10, inverse_update_every=50)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.x_train, data.y_train
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if precond is not None:
            precond.step()
        opt.step()
    with torch.no_grad():
        logits = model(data.x_test)
    return {"test_loss": float(F.cross_entropy(logits, data.y_test)),
            "test_accuracy": float((logits.argmax(1) == data.y_test).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 steps, one seed")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    steps, seeds = (100, 1) if args.quick else (args.steps, args.seeds)
    torch.set_num_threads(1)
    data = load_dataset("digits")
    results: dict[str, Any] = {}
    for setting in ("kron_mlp", "adapter"):
        for optimizer in ("kfac", "adam", "sgd"):
            runs = []
            for seed in range(seeds):
                if setting == "kron_mlp":
                    torch.manual_seed(seed)
                    model = kron_mlp()
                else:
                    model = adapter_model(data, seed)
                runs.append(train(model, data, optimizer, steps, seed))
            results[f"{setting}/{optimizer}"] = {k: [r[k] for r in runs] for k in runs[0]}
    emit({"script": "benchmarks/kron_linear.py", "steps": steps, "seeds": seeds, "batch": 128,
          "results": results}, args.out)


if __name__ == "__main__":
    main()
