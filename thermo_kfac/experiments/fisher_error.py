"""``thermo-kfac fisher-error``: how well do Kronecker approximations match each layer's exact
Fisher block?

On one batch of a small model, the exact block of every Linear/Conv2d layer is taken from
per-example gradients computed by autograd (``torch.func``):

* empirical Fisher: ``F = (1/N) sum_n grad l_n grad l_n^T`` (data labels);
* GGN (= Fisher for these exponential-family losses): ``F = (1/N) sum_n J_n^T H_n J_n``, with
  ``H_n`` the Hessian of the per-example loss w.r.t. the model output (autograd) and
  ``J_n^T H_n J_n = sum_k v_nk v_nk^T``, ``v_nk = J_n^T H_n^(1/2) e_k``.

The approximations are built from the layer's captured inputs and output gradients (the rows a
K-FAC preconditioner sees): K-FAC-expand, K-FAC-reduce (Eschenhagen et al. 2023; identical to
expand for a layer applied once per example, i.e. without weight sharing), KPSVD, deflation and
KFAC-corrected (Koroko et al., :mod:`thermo_kfac.solvers.kronecker_svd`; for weight-sharing
layers with the exact per-example rearrangement, cross-position terms included), and the exact
diagonal of ``F`` (the best diagonal approximation in Frobenius norm). Each gets the relative
Frobenius error ``||F_approx - F||_F / ||F||_F``.

Small blocks (up to 2500 parameters) are formed and compared entrywise. Larger ones are never
formed: with ``F = sum_m vec(V_m) vec(V_m)^T`` over the per-example gradient matrices ``V_m``,
``||F||^2 = ||Gram(V)||^2``, ``<F, kron(G, A)> = sum_m <V_m, G V_m A>`` and
``<kron(G1, A1), kron(G2, A2)> = <A1, A2> <G1, G2>`` give every error in float64 (relative errors
below about 1e-7 are then at the round-off floor of this expansion).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hw_models.validation import check_choice, check_positive
from thermo_kfac.capture import LayerAdapter, make_adapter
from thermo_kfac.experiments._io import atomic_write, jsonable, widths_list
from thermo_kfac.solvers.kronecker_svd import kronecker_svd

METHODS = ("kfac_expand", "kfac_reduce", "kpsvd", "deflation", "kfac_corrected", "diagonal")
FISHERS = ("empirical", "ggn")
TASK_LOSS = {"classification": "cross_entropy", "regression": "mse", "autoencoder": "bce"}


def per_example_loss(loss: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of one example (``output`` without batch dim), summed over its features."""
    if loss == "cross_entropy":
        return F.cross_entropy(output.unsqueeze(0), target.unsqueeze(0), reduction="sum")
    if loss == "mse":
        return (output - target).square().sum()
    return F.binary_cross_entropy_with_logits(output, target, reduction="sum")


def batch_loss(loss: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_n l_n`` over a batch."""
    if loss == "cross_entropy":
        return F.cross_entropy(output, target, reduction="sum")
    if loss == "mse":
        return (output - target.reshape(output.shape)).square().sum()
    return F.binary_cross_entropy_with_logits(output, target.reshape(output.shape), reduction="sum")


@dataclass
class LayerFisher:
    """One layer's exact Fisher factors and captured rows (float64).

    ``grads``: ``(M, d_out, d_in)`` matrices with ``F = sum_m vec(V_m) vec(V_m)^T``;
    ``a``: ``(N R, d_in)`` inputs; ``g``: ``(K, N R, d_out)`` output gradients scaled by
    ``1/sqrt(N)``; ``positions``: rows per example ``R``.
    """

    name: str
    grads: torch.Tensor
    a: torch.Tensor
    g: torch.Tensor
    positions: int

    @property
    def n_params(self) -> int:
        return self.grads.shape[1] * self.grads.shape[2]


def exact_fishers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, fisher: str, *,
                  max_params: int | None = None) -> list[LayerFisher]:
    """Per-layer exact Fisher (``"empirical"`` or ``"ggn"``) of ``model`` on the batch ``(x, y)``.

    The model is used in float64. Layers with more than ``max_params`` parameters are left out.
    """
    check_choice("fisher", fisher, FISHERS)
    check_choice("loss", loss, tuple(TASK_LOSS.values()))
    model = model.double()
    x = x.double()
    y = y.double() if y.is_floating_point() else y
    n = x.shape[0]
    adapters: dict[str, LayerAdapter] = {}
    for name, module in model.named_modules():
        adapter = make_adapter(name, module)
        if adapter is not None and module.weight.requires_grad:
            size = adapter.d_out * adapter.d_in
            if max_params is None or size <= max_params:
                adapters[name] = adapter
    if not adapters:
        raise ValueError("no Linear/Conv2d layer to analyse (all exceed --max-params?)")
    params = {f"{name}.{p}": t.detach() for name, a in adapters.items()
              for p, t in a.module.named_parameters(recurse=False)}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))

    def output_one(p: dict[str, torch.Tensor], x1: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {**fixed, **p}, (x1.unsqueeze(0),))[0]

    # Per-example gradients by autograd: the reference the approximations are compared against.
    outputs = model(x).detach()
    if fisher == "empirical":
        def loss_one(p: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
            return per_example_loss(loss, output_one(p, x1), y1)

        per_example = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        per_example = {k: v.unsqueeze(1) for k, v in per_example.items()}  # (N, K=1, ...)
        cotangents = None
    else:
        # reverse-over-reverse (torch.func.hessian's forward mode loads slow jit decompositions)
        hessian = torch.func.jacrev(torch.func.jacrev(lambda o, t: per_example_loss(loss, o, t)))
        hess = torch.func.vmap(hessian)(outputs, y)
        c = outputs[0].numel()
        vals, vecs = torch.linalg.eigh(hess.reshape(n, c, c))
        roots = vecs * vals.clamp_min(0).sqrt().unsqueeze(1)  # H_n = roots roots^T
        jac = torch.func.vmap(torch.func.jacrev(output_one), in_dims=(None, 0))(params, x)
        # v_nk = J_n^T roots[:, k]: one "gradient" per example and column of H_n^(1/2)
        per_example = {k: torch.einsum("nc...,nck->nk...", v.reshape(n, c, *v.shape[outputs.dim():]), roots)
                       for k, v in jac.items()}
        cotangents = roots.transpose(1, 2).reshape(n, c, *outputs.shape[1:])  # (N, K, out...)

    # Rows: inputs from a forward pre-hook, output gradients from tensor hooks.
    inputs: dict[str, torch.Tensor] = {}
    out_tensors: dict[str, torch.Tensor] = {}
    handles = []
    for name, adapter in adapters.items():
        def pre(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            inputs[name] = args[0].detach()

        def post(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name) -> None:
            out_tensors[name] = out

        handles += [adapter.module.register_forward_pre_hook(pre),
                    adapter.module.register_forward_hook(post)]
    try:
        with torch.enable_grad():
            out = model(x)
            layer_outputs = [out_tensors[name] for name in adapters]
            if cotangents is None:
                total = batch_loss(loss, out, y)  # sum_n l_n: its output gradients are per example
                passes = [torch.autograd.grad(total, layer_outputs, retain_graph=True)]
            else:
                passes = [torch.autograd.grad(out, layer_outputs, grad_outputs=cotangents[:, k],
                                              retain_graph=True)
                          for k in range(cotangents.shape[1])]
    finally:
        for handle in handles:
            handle.remove()

    layers = []
    for i, (name, adapter) in enumerate(adapters.items()):
        a = adapter.input_rows(inputs[name])
        g = torch.stack([adapter.output_rows(p[i]) for p in passes]) / math.sqrt(n)
        positions = a.shape[0] // n
        weight = per_example[f"{name}.weight"]
        grads = weight.reshape(n, weight.shape[1], weight.shape[2], -1)
        if adapter.has_bias:
            grads = torch.cat([grads, per_example[f"{name}.bias"].unsqueeze(-1)], dim=-1)
        grads = grads.reshape(-1, grads.shape[-2], grads.shape[-1]) / math.sqrt(n)
        layer = LayerFisher(name, grads, a, g, positions)
        _check_rows(layer)
        layers.append(layer)
    return layers


def _check_rows(layer: LayerFisher) -> None:
    """The rows must reproduce autograd's per-example gradients ``V_nk = sum_r g a^T``."""
    k, n = layer.g.shape[0], layer.a.shape[0] // layer.positions
    a = layer.a.reshape(n, layer.positions, -1)
    g = layer.g.reshape(k, n, layer.positions, -1)
    from_rows = torch.einsum("knro,nri->nkoi", g, a).reshape(layer.grads.shape)
    scale = float(layer.grads.norm()) or 1.0
    if float((from_rows - layer.grads).norm()) > 1e-8 * scale:
        raise RuntimeError(f"layer {layer.name!r}: the captured rows do not reproduce the "
                           "per-example gradients (is the layer applied more than once per forward?)")


def approximations(layer: LayerFisher, *, tol: float = 1e-10,
                   max_iter: int = 2000) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{method: [(A_k, G_k)]}``: each Kronecker approximation ``sum_k kron(G_k, A_k)``."""
    a, g, r = layer.a, layer.g, layer.positions
    n = a.shape[0] // r
    A_exp = a.T @ a / (n * r)
    G_exp = torch.einsum("kmo,kmp->op", g, g)
    a_bar = a.reshape(n, r, -1).mean(1)
    g_sum = g.reshape(g.shape[0], n, r, -1).sum(2)
    A_red = a_bar.T @ a_bar / n
    G_red = torch.einsum("kno,knp->op", g_sum, g_sum)
    kwargs = {"rows_per_example": r, "tol": tol, "max_iter": max_iter,
              "generator": torch.Generator().manual_seed(0)}
    rank2 = kronecker_svd(a, g, 2, **kwargs).terms
    correction = kronecker_svd(a, g, 1, subtract=(A_exp, G_exp), **kwargs).terms
    return {"kfac_expand": [(A_exp, G_exp)], "kfac_reduce": [(A_red, G_red)], "kpsvd": rank2[:1],
            "deflation": rank2, "kfac_corrected": [(A_exp, G_exp), *correction]}


def relative_errors(layer: LayerFisher, *, dense_limit: int = 2500) -> dict[str, float]:
    """Relative Frobenius error of every method in :data:`METHODS` for one layer.

    Blocks of at most ``dense_limit`` parameters are formed and compared entrywise (accurate to
    round-off); larger ones use the Gram identities of the module docstring, whose cancellation
    floors errors near ``sqrt(eps) ~ 1e-8``.
    """
    V = layer.grads.flatten(1)
    gram = V @ V.T
    f_sq = float(gram.square().sum())
    if f_sq == 0:
        return {m: float("nan") for m in METHODS}
    errors = {}
    if layer.n_params <= dense_limit:
        Fx = V.T @ V
        f_norm = float(Fx.norm())
        for method, terms in approximations(layer).items():
            approx = sum(torch.kron(G, A) for A, G in terms)
            errors[method] = float((approx - Fx).norm()) / f_norm
        errors["diagonal"] = float((Fx - torch.diag(Fx.diagonal())).norm()) / f_norm
        return {m: errors[m] for m in METHODS}
    for method, terms in approximations(layer).items():
        cross = sum(float(torch.einsum("mij,ik,mkl,lj->", layer.grads, G, layer.grads, A))
                    for A, G in terms)
        own = sum(float((A1 * A2).sum() * (G1 * G2).sum()) for A1, G1 in terms for A2, G2 in terms)
        errors[method] = math.sqrt(max(f_sq - 2 * cross + own, 0.0) / f_sq)
    diag_sq = float(V.square().sum(0).square().sum())
    errors["diagonal"] = math.sqrt(max(f_sq - diag_sq, 0.0) / f_sq)
    return {m: errors[m] for m in METHODS}


# --------------------------------------------------------------------------------------- driver
def fisher_error(model_name: str = "mlp", *, dataset: str = "digits", batch_size: int = 64,
                 fishers: Sequence[str] = FISHERS, widths: Sequence[int] | None = (32, 32),
                 seed: int = 0, max_params: int = 20000, pretrain_steps: int = 0,
                 progress: bool = False) -> dict[str, Any]:
    """Relative errors of every method on every layer; returns the JSON-ready results dict."""
    from thermo_kfac.data import load_dataset
    from thermo_kfac.models import build_model, model_options

    check_positive("batch_size", batch_size, integer=True)
    check_positive("max_params", max_params, integer=True)
    check_positive("pretrain_steps", pretrain_steps, integer=True, allow_zero=True)
    fishers = [check_choice("fisher", f, FISHERS) for f in fishers]
    task = "autoencoder" if model_name == "autoencoder" else None
    data = load_dataset(dataset, task=task, seed=seed)
    loss = TASK_LOSS[data.task]
    torch.manual_seed(seed)
    options = {}
    if widths is not None and "widths" in model_options(model_name):
        options["widths"] = tuple(widths)
    model = build_model(model_name, data, **options)
    generator = torch.Generator().manual_seed(seed)
    if pretrain_steps:
        _pretrain(model, data, loss, pretrain_steps, batch_size, generator)
    index = torch.randperm(len(data.x_train), generator=generator)[:batch_size]
    x, y = data.x_train[index], data.y_train[index]
    rows, notes = [], []
    layers_info: dict[str, dict[str, int]] = {}
    for fisher in fishers:
        layers = exact_fishers(model, x, y, loss, fisher, max_params=max_params)
        iterator = layers
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(layers, desc=f"{fisher} Fisher", unit="layer", file=sys.stderr)
        for layer in iterator:
            layers_info[layer.name] = {"params": layer.n_params, "positions": layer.positions}
            for method, err in relative_errors(layer).items():
                rows.append({"name": layer.name, "method": method, "rel_error": err, "fisher": fisher,
                             "params": layer.n_params, "positions": layer.positions})
    shared = sorted(n for n, i in layers_info.items() if i["positions"] > 1)
    plain = sorted(n for n, i in layers_info.items() if i["positions"] == 1)
    if plain:
        notes.append("layers without weight sharing (one row per example): kfac_reduce coincides "
                     f"with kfac_expand: {', '.join(plain)}")
    if shared:
        notes.append(f"weight-sharing layers (several positions per example): {', '.join(shared)}")
    skipped = [name for name, module in model.named_modules()
               if make_adapter(name, module) is not None and name not in layers_info]
    if skipped:
        notes.append(f"left out (more than max_params={max_params} parameters): {', '.join(skipped)}")
    return {"model": model_name, "dataset": dataset, "loss": loss, "batch_size": int(len(x)),
            "seed": seed, "pretrain_steps": pretrain_steps, "fishers": list(fishers),
            "methods": list(METHODS), "notes": notes, "layers": rows}


def _pretrain(model: nn.Module, data: Any, loss: str, steps: int, batch_size: int,
              generator: torch.Generator) -> None:
    """A few Adam steps, so the Fisher is that of a partly trained network."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        index = torch.randint(len(data.x_train), (batch_size,), generator=generator)
        out = model(data.x_train[index])
        target = data.y_train[index]
        if loss == "cross_entropy":
            value = F.cross_entropy(out, target)
        elif loss == "mse":
            value = F.mse_loss(out, target)
        else:
            value = F.binary_cross_entropy_with_logits(out, target.reshape(out.shape))
        opt.zero_grad()
        value.backward()
        opt.step()


# ------------------------------------------------------------------------------------- output
def format_table(results: dict[str, Any]) -> str:
    """One line per layer and Fisher type, one column per method."""
    lines = [f"relative Frobenius error ||F_approx - F|| / ||F||  (model {results['model']}, "
             f"{results['dataset']}, batch {results['batch_size']}, loss {results['loss']})"]
    head = f"{'layer':<22}{'fisher':<10}{'params':>8}{'R':>4}" + "".join(f"{m:>15}" for m in METHODS)
    lines += [head, "-" * len(head)]
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for row in results["layers"]:
        table.setdefault((row["name"], row["fisher"]), {"row": row})[row["method"]] = row["rel_error"]
    for (name, fisher), cells in table.items():
        row = cells["row"]
        lines.append(f"{name:<22}{fisher:<10}{row['params']:>8}{row['positions']:>4}"
                     + "".join(f"{cells[m]:>15.4g}" for m in METHODS))
    lines += [f"note: {note}" for note in results["notes"]]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | Path) -> None:
    """``results`` as JSON (NaN/Inf as null), written atomically."""
    atomic_write(path, json.dumps(jsonable(results), indent=1, allow_nan=False))


def write_csv(results: dict[str, Any], path: str | Path) -> None:
    """One row per layer, Fisher type and method, written atomically."""
    columns = ["name", "fisher", "method", "rel_error", "params", "positions"]

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["layers"])
    atomic_write(path, write)


def write_plot(results: dict[str, Any], path: str | Path) -> None:
    """Grouped bar chart (log scale): one group per layer, one bar per method, a panel per Fisher."""
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone

    fishers = results["fishers"]
    fig, axes = plt.subplots(len(fishers), 1, figsize=(9, 3.4 * len(fishers)), squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, fisher in zip(axes[:, 0], fishers, strict=True):
        rows = [r for r in results["layers"] if r["fisher"] == fisher]
        names = list(dict.fromkeys(r["name"] for r in rows))
        for j, method in enumerate(METHODS):
            values = [next(r["rel_error"] for r in rows if r["name"] == n and r["method"] == method)
                      for n in names]
            ax.bar([i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(names))],
                   [max(v, 1e-16) for v in values], width, label=method)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("relative Frobenius error")
        ax.set_title(f"{fisher} Fisher, model {results['model']} ({results['dataset']}, "
                     f"batch {results['batch_size']})")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    """Add the ``fisher-error`` sub-command."""
    from thermo_kfac.models import available_models

    p = subparsers.add_parser(
        "fisher-error", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="relative error of K-FAC, KPSVD, deflation, ... against each layer's exact Fisher",
        description="Compute each layer's exact Fisher (empirical and/or GGN) block by autograd on "
                    "one batch and the relative Frobenius error of K-FAC-expand/-reduce, KPSVD, "
                    "deflation, KFAC-corrected and the diagonal approximation.")
    p.add_argument("--model", default="mlp", choices=available_models(), help="model of thermo_kfac.models")
    p.add_argument("--dataset", default="digits", help="dataset of thermo_kfac.data")
    p.add_argument("--widths", type=widths_list, default=(32, 32),
                   help="hidden widths of mlp/autoencoder (comma-separated)")
    p.add_argument("--batch-size", type=int, default=64, help="examples in the batch")
    p.add_argument("--fisher", choices=[*FISHERS, "both"], default="both", help="Fisher type(s)")
    p.add_argument("--max-params", type=int, default=20000,
                   help="leave out layers with more parameters (the per-example gradients are kept)")
    p.add_argument("--pretrain-steps", type=int, default=0, help="Adam steps before measuring")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, batch and data split")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="write one CSV row per layer and method")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a grouped bar chart (PNG)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(check_positive("threads", args.threads, integer=True))
    fishers = list(FISHERS) if args.fisher == "both" else [args.fisher]
    results = fisher_error(args.model, dataset=args.dataset, batch_size=args.batch_size, fishers=fishers,
                           widths=args.widths or None, seed=args.seed, max_params=args.max_params,
                           pretrain_steps=args.pretrain_steps, progress=sys.stderr.isatty())
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    if args.csv:
        write_csv(results, args.csv)
    if args.plot:
        write_plot(results, args.plot)
    return 0


__all__ = ["FISHERS", "METHODS", "LayerFisher", "approximations", "exact_fishers", "fisher_error",
           "format_table", "register", "relative_errors", "write_csv", "write_json", "write_plot"]
