"""The CNN and ViT at width 256 on the realistic-width images (``digits28``): they build with the
layer sizes their architecture implies, thermodynamic K-FAC with every default serves every layer of
one step without a digital fallback and follows digital K-FAC's direction, and ``--width`` reaches
the model through ``compare`` and ``noise-study``. One step each on a small subset; no training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thermo_kfac import KFACPreconditioner, cli
from thermo_kfac.data import load_dataset
from thermo_kfac.models import build_model, with_width

WIDTH = 256


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits28", max_train=128)


def _expected_layers(name: str) -> dict[str, tuple[int, int]]:
    """(input factor size with the bias column, output size) of every K-FAC layer, from the
    architecture: 28x28 single-channel images, 3x3 convolutions, 2x2 pooling, 4x4 patches."""
    if name == "cnn":  # channels (16, 32): 28 -> 14 -> 7 after the two poolings
        return {"features.0": (1 * 9 + 1, 16), "features.3": (16 * 9 + 1, 32),
                "classifier.1": (32 * 7 * 7 + 1, WIDTH), "classifier.3": (WIDTH + 1, 10)}
    layers = {"embed": (4 * 4 + 1, WIDTH), "head": (WIDTH + 1, 10)}
    for block in range(2):
        prefix = f"blocks.{block}."
        layers |= {prefix + "self_attn.in_proj": (WIDTH + 1, 3 * WIDTH),
                   prefix + "self_attn.out_proj": (WIDTH + 1, WIDTH),
                   prefix + "linear1": (WIDTH + 1, 2 * WIDTH), prefix + "linear2": (2 * WIDTH + 1, WIDTH)}
    return layers


def _model(name: str, data):
    torch.manual_seed(0)
    options = with_width(name, {"patch": 4} if name == "vit" else {}, WIDTH)
    return build_model(name, data, **options)


def _param_names(layer: str) -> tuple[str, str]:
    """The weight and bias parameters of a K-FAC layer (attention's input projection is stored on
    the ``nn.MultiheadAttention`` as ``in_proj_weight`` / ``in_proj_bias``)."""
    if layer.endswith("self_attn.in_proj"):
        return layer + "_weight", layer + "_bias"
    return layer + ".weight", layer + ".bias"


def _preconditioned_step(model, solver: str, x, y) -> tuple[dict[str, torch.Tensor], KFACPreconditioner]:
    """One K-FAC step's preconditioned gradients, divided by the step's KL-clip scale (one scalar
    for the whole model, set from the preconditioned gradient itself), and the preconditioner."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    precond = KFACPreconditioner(model, optimizer=opt, solver=solver)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    scale = precond.last_report["kl_scale"] or 1.0
    return {n: p.grad.detach().double() / scale for n, p in model.named_parameters()}, precond


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_width_256_models_step_with_thermo_kfac_within_the_law(name, data):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model(name, data)
        x, y = data.x_train[:64], data.y_train[:64]
        assert model(x).shape == (64, 10)
        thermo_grads, thermo = _preconditioned_step(model, "thermo", x, y)
        digital_grads, _ = _preconditioned_step(_model(name, data), "eigh", x, y)  # same seed, same init
    finally:
        torch.set_num_threads(threads)
    sizes = {n: (s.adapter.d_in, s.adapter.d_out) for n, s in thermo.layer_table.items()}
    assert sizes == _expected_layers(name)
    assert {n: int(s.fallbacks) for n, s in thermo.layer_table.items()} == dict.fromkeys(sizes, 0)
    reports = thermo.last_report["solver_reports"]
    for layer in sizes:
        # The layer's whole update (weight and bias, as the solver sees it) against digital K-FAC
        # (eigh, the same factored damping): within the error the solver's law predicted for it.
        thermo_update = torch.cat([thermo_grads[p].flatten() for p in _param_names(layer)])
        digital_update = torch.cat([digital_grads[p].flatten() for p in _param_names(layer)])
        error = float((thermo_update - digital_update).norm() / digital_update.norm())
        predicted = reports[f"{layer}/apply"].info["pricing"]["predicted_rel_error"]
        assert error <= 1.5 * predicted + 0.02 and error < 0.5, (layer, error, predicted)


def test_width_reaches_the_model_through_compare_and_noise_study(tmp_path, monkeypatch, capsys):
    # compare: a real (one-step, SGD) run of the CNN at width 256; its config names the width.
    out = tmp_path / "cnn"
    assert cli.main(["compare", "--dataset", "digits28", "--model", "cnn", "--width", "256",
                     "--max-train", "32", "--steps", "1", "--optimizers", "sgd", "--threads", "1",
                     "--out", str(out), "--no-progress"]) == 0
    assert '"hidden": 256' in (out / "results.json").read_text()
    # noise-study: the model options handed to the study.
    seen = {}

    def fake_study(dataset, model, sweeps, **options):
        seen.update(dataset=dataset, model=model, model_options=options["model_options"])
        raise KeyboardInterrupt

    monkeypatch.setattr("thermo_kfac.experiments.noise_study.cli.noise_study", fake_study)
    assert cli.main(["noise-study", "--dataset", "digits28", "--model", "vit", "--width", "256",
                     "--model-options", "patch=4", "--sweep", "bits=8", "--no-progress"]) == 130
    assert seen == {"dataset": "digits28", "model": "vit", "model_options": {"patch": 4, "dim": 256}}


@pytest.mark.parametrize("argv, message", [
    (["compare", "--model", "mlp", "--width", "256"], "--width applies to cnn, vit, rnn, not model 'mlp'"),
    (["compare", "--model", "cnn", "--width", "0"], "width=0 is out of range"),
    (["compare", "--model", "vit", "--width", "256", "--model-options", "dim=128"], "disagree"),
    (["noise-study", "--model", "autoencoder", "--width", "64", "--sweep", "bits=8"], "--widths"),
])
def test_bad_width_gets_one_clear_error_line(argv, message, capsys):
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"thermo-kfac {argv[0]}: error:") and message in err, err
