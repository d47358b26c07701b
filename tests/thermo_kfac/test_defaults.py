"""One source of K-FAC defaults (thermo_kfac.defaults), and they train the README models."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from thermo_kfac import KFAC, KFACPreconditioner
from thermo_kfac.data import load_dataset
from thermo_kfac.defaults import BASE_OPTIMIZER_DEFAULTS, KFAC_ADAPTIVE_DEFAULTS, KFAC_DEFAULTS
from thermo_kfac.experiments.training import parse_optimizer_spec, resolve_options
from thermo_kfac.models import build_model

ROOT = Path(__file__).resolve().parents[2]


def _readme_sgd() -> dict[str, float]:
    """The learning rate and momentum of the README's KFACPreconditioner example."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"torch\.optim\.SGD\(model\.parameters\(\), lr=([0-9.e-]+), momentum=([0-9.]+)\)", text)
    assert match, "the README's K-FAC example no longer builds torch.optim.SGD(model.parameters(), lr=..)"
    return {"lr": float(match.group(1)), "momentum": float(match.group(2))}


def test_library_and_cli_read_the_same_defaults():
    signature = inspect.signature(KFACPreconditioner).parameters
    for key, value in KFAC_DEFAULTS.items():
        if key != "kl_clip":  # "default": the value below when an optimizer gives the lr
            assert signature[key].default == value, key
    adaptive = inspect.signature(KFAC).parameters
    for key, value in KFAC_ADAPTIVE_DEFAULTS.items():
        if key != "kl_clip":  # KFAC owns the step size: no KL clip at all
            assert adaptive[key].default == value, key
    cli = resolve_options(parse_optimizer_spec("kfac"))
    assert {k: cli[k] for k in KFAC_DEFAULTS} == KFAC_DEFAULTS
    assert {k: cli[k] for k in BASE_OPTIMIZER_DEFAULTS["sgd"]} == BASE_OPTIMIZER_DEFAULTS["sgd"]
    adam_base = resolve_options(parse_optimizer_spec("kfac:base=adam"))
    assert adam_base["lr"] == BASE_OPTIMIZER_DEFAULTS["adam"]["lr"]
    # the README example's optimizer is the CLI's kfac base optimizer
    assert _readme_sgd() == BASE_OPTIMIZER_DEFAULTS["sgd"]


def test_kl_clip_default_is_on_with_an_optimizer_and_off_without():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert KFACPreconditioner(model, optimizer=opt).kl_clip == KFAC_DEFAULTS["kl_clip"]
    assert KFACPreconditioner(torch.nn.Sequential(torch.nn.Linear(4, 3))).kl_clip is None
    assert KFACPreconditioner(torch.nn.Sequential(torch.nn.Linear(4, 3)), optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), kl_clip=None).kl_clip is None
    with pytest.raises(ValueError, match="kl_clip needs the learning rate"):
        KFACPreconditioner(torch.nn.Sequential(torch.nn.Linear(4, 3)), kl_clip=1e-3)


def _check_finite(precond: KFACPreconditioner, step: int) -> None:
    for name, (a, g) in precond.factors().items():
        assert bool(torch.isfinite(a).all() and torch.isfinite(g).all()), f"step {step}: factors of {name}"


@pytest.mark.parametrize("model_name, lr", [("mlp", None), ("mlp", 0.1), ("vit", None)])
def test_readme_models_train_with_the_library_defaults(model_name, lr):
    """KFACPreconditioner with every default and the README's SGD (the issue's case: lr 0.1 on
    the 64-128-128-10 MLP gave non-finite factors within 20 steps with the old defaults)."""
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model(model_name, data)
    sgd = {**_readme_sgd(), **({"lr": lr} if lr is not None else {})}
    opt = torch.optim.SGD(model.parameters(), **sgd)
    precond = KFACPreconditioner(model, optimizer=opt)
    steps = KFAC_DEFAULTS["inverse_update_every"] + 10  # two inverse updates
    losses = []
    stream = data.stream(256, seed=0)  # epoch after epoch
    for step in range(steps):
        _, x, y = next(stream)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        precond.step()
        opt.step()
        losses.append(float(loss))
        assert math.isfinite(losses[-1]), f"step {step}: loss {losses[-1]}"
        _check_finite(precond, step)
    assert sum(precond.fallbacks().values()) == 0
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]  # and it learns


@pytest.mark.parametrize("model_name", ["mlp", "vit"])
def test_readme_models_train_with_kfac_defaults(model_name):
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model(model_name, data)
    opt = KFAC(model, loss="cross_entropy")
    losses = []
    stream = data.stream(256, seed=0)
    for _ in range(25):
        _, x, y = next(stream)
        losses.append(float(opt.step(x, y)))
        assert math.isfinite(losses[-1])
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]
