"""``thermo-kfac calibrate`` and ``thermo-kfac project``: hardware cost model on the command line.

``calibrate`` times GEMM/Cholesky/eigh/inverse on this machine, fits the digital time model of
:mod:`hw_models.devices` and saves it where the ``cpu`` (or ``cuda``) preset finds it.

``project`` prices one training step of a network on a digital device alone and with a
thermodynamic co-processor (:mod:`hw_models.cost`, priced by :mod:`hw_models.pricing`), per layer
and in total; or sweeps one parameter, draws a 2-D break-even map, prices a run's ``trace.json``,
or sets the seed paper's scenario beside the default one (:mod:`hw_models.projection`). Networks
are the tables of :mod:`hw_models.workloads` or any torch model given as ``module.path:factory``:
it is built on the ``meta`` device (no weights are allocated) and a forward pass on a meta tensor
records every Linear/Conv layer's input shape.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hw_models.calibration import calibrate, save_calibration
from hw_models.cost import (
    DIGITAL_METHODS,
    SWEEP_AXES,
    THERMO_METHODS,
    KFACSchedule,
    Scenario,
    break_even_kappa,
    default_sweep_values,
    step_cost,
    sweep,
)
from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_EPS, DEFAULT_KAPPA, DEFAULT_THERMO
from hw_models.devices import (
    DIGITAL_PRESETS,
    OPS,
    OVERSIZE_POLICIES,
    PRECISIONS,
    THERMO_PRESETS,
    default_calibration_path,
    digital_device,
    thermo_device,
)
from hw_models.projection import (
    DEFAULT_STEPS_RATIO,
    MAP_KINDS,
    SCENARIOS,
    KappaModel,
    load_trace,
    price_trace,
    speedup_map,
)
from hw_models.validation import check_positive
from hw_models.workloads import WORKLOADS, LayerShape, Workload, workload
from thermo_kfac.experiments import executors
from thermo_kfac.experiments._io import (
    DefaultsHelpFormatter,
    atomic_write,
    bandwidth_gbps,
    format_seconds,
    int_list,
    text_table,
)
from thermo_kfac.experiments.project_report import (
    KAPPA_EPS_MAP_WIDTH,
    LAYER_HEADERS,
    assumptions,
    fmt_ratio,
    headline,
    layer_rows,
    map_title,
    plot_map,
    plot_project,
    plot_sweep,
    project_json,
    run_paper,
    scenario_text,
    sweep_values,
    write_csv,
)

# Earlier names of the shared formatters (notebooks and scripts import them from here).
fmt_time = format_seconds
table = text_table

# --------------------------------------------------------------------------------------------
# Torch models read on the meta device
# --------------------------------------------------------------------------------------------


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``"package.module:callable"`` to the callable (a model class or factory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model {spec!r} is neither a known model ({', '.join(WORKLOADS)}) nor of "
                         "the form 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for --model {spec!r}: {err}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from --model {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable; it must build a torch.nn.Module")
    return target


def workload_from_module(model: Any, *, name: str, batch: int, input_shape: Sequence[int] | None = None,
                         input_dtype: str = "float") -> Workload:
    """Layer shapes of a torch model (ideally built on the meta device).

    With ``input_shape`` (one example, no batch dimension) a forward pass on a meta tensor
    records, for every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``, how many positions it is
    applied to per example (summed over calls, as K-FAC-expand does); layers the pass never
    reaches are left out. Without it, linear layers get one position and convolutions are an
    error (their position count depends on the input size).
    """
    import torch
    from torch import nn

    check_positive("batch", batch, integer=True)
    kinds = ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d"), (nn.Linear, "linear"))
    modules = []
    for mod_name, module in model.named_modules():
        for cls, kind in kinds:
            if isinstance(module, cls):
                modules.append((mod_name or type(model).__name__, module, kind))
                break
    if not modules:
        raise ValueError(f"model {name!r} has no nn.Linear or nn.Conv1d/Conv2d layers to precondition")
    positions: dict[int, float] = {id(m): 0.0 for _, m, _ in modules}
    if input_shape is not None:
        dims = [check_positive("input shape entry", int(d), integer=True) for d in input_shape]

        def hook(module: Any, inputs: Any, output: Any) -> None:
            if isinstance(module, nn.Linear):
                positions[id(module)] += inputs[0].numel() / module.in_features
            else:
                positions[id(module)] += output[0].numel() / module.out_channels

        handles = [m.register_forward_hook(hook) for _, m, _ in modules]
        dtype = {"float": torch.float32, "long": torch.long}[input_dtype]
        try:
            with torch.no_grad():
                model(torch.zeros((1, *dims), dtype=dtype, device="meta"))
        except Exception as err:  # any failure of user code: report it as a bad input
            shape = ", ".join(map(str, dims))
            raise ValueError(f"forward pass of {name!r} on a meta tensor of shape (1, {shape}) failed: "
                             f"{type(err).__name__}: {err}") from None
        finally:
            for handle in handles:
                handle.remove()
    layers = []
    for mod_name, module, kind in modules:
        reached = positions[id(module)]
        if input_shape is not None and reached == 0:
            continue
        if kind == "linear":
            d_in, d_out = module.in_features, module.out_features
        else:
            if input_shape is None:
                raise ValueError(f"layer {mod_name!r} of {name!r} is a convolution: pass --input-shape "
                                 "(one example, e.g. 3,224,224) so its positions can be counted")
            d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            d_out = module.out_channels
        layers.append(LayerShape(mod_name, d_in, d_out, reached if input_shape is not None else 1.0,
                                 module.bias is not None, kind))
    if not layers:
        raise ValueError(f"the forward pass of {name!r} reached none of its Linear/Conv layers")
    source = "read on the meta device" + (f" with input {tuple(input_shape)}" if input_shape else "")
    return Workload(name, tuple(layers), batch, description=f"torch model {name}", source=source)


def resolve_workload(spec: str, *, batch: int | None = None, input_shape: Sequence[int] | None = None,
                     input_dtype: str = "float") -> Workload:
    """A standard workload by name, or a torch model ``module:factory`` read on the meta device."""
    if spec in WORKLOADS:
        if input_shape is not None:
            raise ValueError(f"--input-shape only applies to torch models given as module:factory, "
                             f"not to {spec!r}")
        return workload(spec, batch=batch)
    factory = load_factory(spec)
    import torch

    try:
        with torch.device("meta"):
            model = factory()
    except Exception as err:
        raise ValueError(f"building {spec!r} on the meta device failed: "
                         f"{type(err).__name__}: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return workload_from_module(model, name=spec, batch=batch or 1, input_shape=input_shape,
                                input_dtype=input_dtype)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def run_calibrate(args: argparse.Namespace) -> int:
    """``thermo-kfac calibrate``: measure, fit, report held-out error, save."""
    result = calibrate(args.device, fit_sizes=args.sizes, holdout_sizes=args.holdout, repeats=args.repeats,
                       quick=args.quick, threads=args.threads, ops=args.ops, power_w=args.power_w,
                       statistic=args.statistic, clock=args.clock)
    dev = result.device
    rows = []
    for m in result.measurements:
        pred = result.predicted(m)
        value = result.measured(m)
        rows.append([m.op, m.n, m.role, format_seconds(m.min_s), format_seconds(m.median_s),
                     format_seconds(m.max_s), format_seconds(pred), f"{100 * (pred - value) / value:+.1f}%"])
    print(f"Calibration of {result.machine['device_name']} ({result.machine['threads']} threads, "
          f"torch {result.machine['torch']}), {result.settings['repeats']} interleaved repeats each; "
          f"{result.settings['clock']} clock, fit to the {result.settings['statistic']}")
    print(text_table(["op", "n", "role", "min", "median", "max", "model", "error"], rows, "lrlrrrrr"))
    print()
    fit_rows = []
    for op in OPS:
        if op in result.fit_error:
            model = dev.op(op)
            fit_rows.append([op, f"{model.eff_max:.3g}", f"{model.n_half:.4g}",
                             format_seconds(model.latency_s),
                             f"{100 * result.fit_error[op]:.1f}%",
                             f"{100 * result.holdout_error.get(op, float('nan')):.1f}%"])
    print("Fit t(n) = latency + flops(n) / (eff_max * peak) * (1 + n_half / n), "
          f"peak = {dev.peak_fp32 / 1e9:.4g} GFLOP/s (best FP32 GEMM);")
    print(f"FP64 GEMM {dev.peak_fp64 / 1e9:.4g} GFLOP/s; memory copy {dev.mem_bandwidth / 1e9:.3g} GB/s")
    print(text_table(["op", "eff_max", "n_half", "latency", "max fit err", "max held-out err"], fit_rows))
    if not args.no_save:
        path = save_calibration(result, args.out)
        print(f"\nsaved to {path}")
    if args.json:
        atomic_write(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def build_scenario(args: argparse.Namespace) -> Scenario:
    """Devices and assumptions from ``project``'s options."""
    digital = digital_device(args.digital, calibration=args.calibration)
    overrides: dict[str, Any] = {}
    if args.cells is not None:
        overrides["cells"] = args.cells
    if args.units is not None:
        overrides["units"] = args.units
    if args.tau is not None:
        overrides["tau_s"] = args.tau
    if args.bandwidth is not None:  # Gb/s (bandwidth_gbps read any unit)
        overrides["io_bandwidth_bps"] = check_positive("bandwidth", args.bandwidth) * 1e9
    if args.kappa0 is not None:
        overrides["kappa0"] = args.kappa0
    if args.oversize is not None:
        overrides["oversize"] = args.oversize
    thermo = thermo_device(args.hardware, **overrides)
    schedule = KFACSchedule(factor_every=args.factor_every, inverse_every=args.inverse_every,
                            digital_method=args.digital_method, precision=args.precision)
    kappa_of = None
    if args.spectra_from:
        kappa_of = KappaModel.from_trace(load_trace(args.spectra_from))
    return Scenario(digital=digital, thermo=thermo, kappa=args.kappa, eps=args.eps, bits=args.bits,
                    method=args.method, schedule=schedule, nongemm_factor=args.nongemm_factor,
                    resident=args.resident, analog_time=args.analog_time, burn_in=args.burn_in,
                    start=args.start, overlap=args.overlap, devices=args.devices, kappa_of=kappa_of)


def run_project(args: argparse.Namespace) -> int:
    """``thermo-kfac project``: per-layer table and step headline, a sweep, a map, a trace, or the
    paper's scenario beside the default one."""
    scenario = build_scenario(args)
    if not args.sweep and (getattr(args, "workers", None) or getattr(args, "cluster", None)
                           or getattr(args, "task_timeout", None)):
        raise ValueError("--workers/--cluster apply to --sweep only (one task per sweep point), and "
                         "so does --task-timeout")
    mode = "--trace" if args.trace else None if args.map or args.sweep else (
        "--scenario paper" if args.scenario == "paper" else None)
    unused = [flag for flag, value in (("--plot", args.plot), ("--csv", args.csv)) if value]
    if mode and unused:  # refused, not silently skipped
        raise ValueError(f"{'/'.join(unused)} cannot be used with {mode}, which writes --json only")
    args.values = sweep_values(args.sweep, args.values)
    if args.trace:
        return _run_trace(args, scenario)
    if args.map:
        return _run_map(args, scenario)
    work = resolve_workload(args.model, batch=args.batch, input_shape=args.input_shape,
                            input_dtype=args.input_dtype)
    if args.spectra_from:
        print(f"spectra from {args.spectra_from}: {scenario.kappa_of.description} "
              "(power law extrapolated to the workload's widths, exponent clamped to [0, 2])")
    if args.sweep:
        return _run_sweep(args, scenario, work)
    if args.scenario == "paper":
        return run_paper(args, scenario, work)
    step = step_cost(work, scenario)
    be_kappa = break_even_kappa(work, scenario)
    print(f"{work.name}: {work.description}; {len(work.layers)} preconditioned layers, "
          f"{work.params / 1e6:.4g} M parameters")
    print(text_table(LAYER_HEADERS, layer_rows(step, group=not args.all_layers), "llllrrrrlrl"))
    print("Per layer and training step: digital/thermo = K-FAC curvature time including the factor "
          "statistics (stats) both pay;\nsolver d/t = digital/thermodynamic time of the rest (inversion "
          "amortized over its period, preconditioning); A/G = factor sizes; R = positions per example.")
    print()
    print(headline(step, scenario, be_kappa))
    upd = step.update_only()
    print(f"  optimizer update only: Adam {fmt_time(upd['adam_update_s'])}, digital K-FAC "
          f"{fmt_time(upd['digital_kfac_update_s'])}, thermodynamic K-FAC "
          f"{fmt_time(upd['thermo_kfac_update_s'])} "
          f"(speed-up {fmt_ratio(upd['update_speedup_vs_digital_kfac'])})")
    errors = [layer.thermo.info.get("predicted_rel_error") for layer, on in
              zip(step.layers, step.assignment, strict=True) if on and layer.thermo]
    if errors:
        print(f"  predicted relative error of the analog layers (law): up to {max(errors):.3g}")
    doc = project_json(step, scenario, be_kappa)
    if args.json:
        atomic_write(args.json, json.dumps(doc, indent=2) + "\n")
    if args.csv:
        cols = ["name", "kind", "n_in", "n_out", "positions", "bias", "digital_s", "thermo_s", "cheaper",
                "method", "digital_j", "thermo_j", "note"]
        write_csv(args.csv, cols, [[row[c] for c in cols] for row in doc["layers"]])
    if args.plot:
        plot_project(args.plot, step, scenario)
    for label, path in (("json", args.json), ("csv", args.csv), ("plot", args.plot)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def sweep_point(axis: str, x: float, scenario: Scenario, workload: Workload, batch: int) -> dict[str, Any]:
    """One point of :func:`hw_models.cost.sweep` (an executor task: top level, picklable by name)."""
    return sweep(axis, [x], scenario, workload=workload, batch=batch)[0]


def _run_sweep(args: argparse.Namespace, scenario: Scenario, work: Workload) -> int:
    with executors.from_args(args) as executor:  # --workers/--cluster: one task per point
        tasks = executor.parallel or executor.task_timeout is not None  # --task-timeout needs tasks
        points = sweep(args.sweep, args.values, scenario, workload=work, batch=work.batch) \
            if not tasks else executors.run_all(executor, [executors.Task(
                f"{args.sweep}={x:g}", sweep_point, dict(axis=args.sweep, x=x, scenario=scenario,
                                                          workload=work, batch=work.batch))
                for x in (args.values or default_sweep_values(args.sweep))])
    scope = "layer" if args.sweep == "width" else "step"
    what = (f"one square layer, batch {work.batch}, curvature work only" if scope == "layer"
            else f"{work.name} training step, batch {work.batch}")
    if args.sweep == "bandwidth":  # priced in bit/s, shown and written in Gb/s
        points = [{**p, "x": p["x"] / 1e9} for p in points]
    unit = {"bandwidth": "Gb/s", "tau": "s"}.get(args.sweep)
    print(f"Sweep of {args.sweep}: {what}; {scenario_text(scenario, skip=[args.sweep])}")
    rows = [[f"{p['x']:g}", format_seconds(p["digital_s"]), format_seconds(p["thermo_s"]),
             fmt_ratio(p["speedup"]) if p["speedup"] is not None else "does not fit",
             fmt_ratio(p["hybrid_speedup"])] for p in points]
    print(text_table([args.sweep + (f" [{unit}]" if unit else ""), "digital", "thermo", "speed-up",
                      "hybrid speed-up"], rows))
    doc = {"sweep": args.sweep, "x_unit": unit, "model": work.name, "hardware": scenario.thermo.name,
           "digital": scenario.digital.name, "scope": scope, "batch": work.batch,
           "assumptions": assumptions(scenario), "points": points}
    if args.json:
        atomic_write(args.json, json.dumps(doc, indent=2) + "\n")
    if args.csv:
        cols = ["x", "digital_s", "thermo_s", "speedup", "hybrid_s", "hybrid_speedup"]
        write_csv(args.csv, cols, [[p[c] for c in cols] for p in points])
    if args.plot:
        plot_sweep(args.plot, args.sweep, points, f"{what}\n{scenario_text(scenario, skip=[args.sweep])}")
    for label, path in (("json", args.json), ("csv", args.csv), ("plot", args.plot)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def _run_trace(args: argparse.Namespace, scenario: Scenario) -> int:
    """``--trace RUN/trace.json``: price exactly the solves the run made."""
    trace = load_trace(args.trace)
    doc = price_trace(trace, thermo=scenario.thermo, digital=scenario.digital,
                      digital_method=scenario.schedule.digital_method, precision=scenario.schedule.precision)
    rows = [[r["name"], f"{r['factor_sizes'][0]}/{r['factor_sizes'][1]}", f"{r['kappa_measured']:.3g}",
             fmt_time(r["digital_s"]), fmt_time(r["thermo_s"]) if r["thermo_s"] is not None else "too big",
             "-" if r["predicted_rel_error"] is None else f"{r['predicted_rel_error']:.3g}",
             "-" if r.get("run_predicted_rel_error") is None else f"{r['run_predicted_rel_error']:.3g}",
             "-" if r["rel_error_to_exact"] is None else f"{r['rel_error_to_exact']:.3g}"]
            for r in doc["layers"]]
    print(f"Trace {args.trace}: {doc['trace_steps']} steps; solver work per step on {doc['digital']} "
          f"vs {doc['hardware']}")
    print(table(["layer", "A/G", "kappa", "digital", "thermo", "law err", "run law", "run err"], rows))
    print("law err: the law on this device (RHS model); run law: the law in the run (its device and "
          "right-hand sides); run err: measured against the exact solve (track_exact)")
    st = doc["step"]
    print(f"per step: digital K-FAC solver work {fmt_time(st['digital_kfac_solver_s'])}, thermodynamic "
          f"{fmt_time(st['thermo_kfac_solver_s'])} (speed-up {fmt_ratio(st['speedup'] or 0.0)})")
    if args.json:
        atomic_write(args.json, json.dumps(doc, indent=2) + "\n")
        print(f"wrote json: {args.json}")
    return 0


def _run_map(args: argparse.Namespace, scenario: Scenario) -> int:
    """``--map width-kappa|kappa-eps``: 2-D break-even map of one square layer (CSV + PNG)."""
    doc = speedup_map(args.map, scenario, batch=args.batch or 1024)
    doc["assumptions"] = assumptions(scenario)
    if args.map == "kappa-eps":
        doc["width"] = KAPPA_EPS_MAP_WIDTH  # speedup_map's fixed layer, stated in the outputs
    header = [f"{doc['y']}\\{doc['x']}"] + [f"{x:g}" for x in doc["xs"]]
    rows = [[f"{y:g}"] + ["-" if v is None else fmt_ratio(v) for v in row]
            for y, row in zip(doc["ys"], doc["speedup"], strict=True)]
    print(f"Speed-up of {map_title(doc, scenario).split(': ', 1)[1]}; > 1: thermodynamic wins, "
          "'-': does not fit")
    print(table(header, rows))
    if args.csv:
        write_csv(args.csv, [doc["y"] + "/" + doc["x"]] + doc["xs"],
                   [[y] + row for y, row in zip(doc["ys"], doc["speedup"], strict=True)])
    if args.json:
        atomic_write(args.json, json.dumps(doc, indent=2) + "\n")
    if args.plot:
        plot_map(args.plot, doc, map_title(doc, scenario))
    for label, path in (("json", args.json), ("csv", args.csv), ("plot", args.plot)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``calibrate`` and ``project`` sub-commands."""
    fmt = DefaultsHelpFormatter  # "(default: X)" once per option
    cal = subparsers.add_parser(
        "calibrate", formatter_class=fmt,
        help="time GEMM/Cholesky/eigh/inverse here and fit the digital cost model",
        description="Time GEMM, Cholesky, eigh and inverse across sizes (interleaved repeats), "
                    "fit t(n) = latency + flops/(eff_max*peak)*(1 + n_half/n) per operation, report the "
                    "error on held-out sizes, and save the fit as JSON for the 'cpu'/'cuda' presets. "
                    f"Default file: {default_calibration_path('cpu')} (or $THERMO_KFAC_CALIBRATION).")
    cal.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="what to time")
    cal.add_argument("--quick", action="store_true", help="fewer sizes and repeats (about 2 s on 2 cores)")
    cal.add_argument("--sizes", type=int_list, default=None, metavar="N,N,...",
                     help="sizes to fit (default: 257,...,1921; with --quick 257,...,865)")
    cal.add_argument("--holdout", type=int_list, default=None, metavar="N,N,...",
                     help="sizes held out of the fit to measure its prediction error")
    cal.add_argument("--repeats", type=int, default=None,
                     help="interleaved repeats per size (default 5, quick 3)")
    cal.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    cal.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                     help="timer: cpu = the thread's CPU time (single-threaded CPU runs, immune to other "
                          "processes); auto = cpu with --threads 1, else wall")
    cal.add_argument("--statistic", choices=["auto", "min", "median"], default="auto",
                     help="repeat statistic the fit uses; auto = median with the cpu clock, else min")
    cal.add_argument("--ops", type=lambda s: [o for o in s.split(",") if o], default=list(OPS),
                     metavar="OP,OP", help=f"operations to time, of {','.join(OPS)} (gemm always)")
    cal.add_argument("--power-w", type=float, default=None,
                     help="device power for the energy model (default 6.25 W per CPU thread, 400 W GPU)")
    cal.add_argument("--out", default=None, help="where to save the calibration (default: the preset's file)")
    cal.add_argument("--no-save", action="store_true", help="only print; do not write the calibration file")
    cal.add_argument("--json", default=None, metavar="PATH", help="also write the full result here")
    cal.set_defaults(func=run_calibrate)

    proj = subparsers.add_parser(
        "project", formatter_class=fmt,
        help="project K-FAC step time on digital vs thermodynamic hardware",
        description="Price one training step of a network (per-layer K-FAC curvature work, forward/"
                    "backward, optimizer) on a digital device alone and with a thermodynamic "
                    "co-processor; print a per-layer table and the headline speed-up, or sweep one "
                    "parameter. Models and assumptions: docs/hardware_model.md.")
    proj.add_argument("--model", default="vit-b16",
                      help=f"one of {', '.join(WORKLOADS)}, or a torch model 'package.module:factory' "
                           "(built on the meta device; see --input-shape)")
    proj.add_argument("--input-shape", type=int_list, default=None, metavar="D,D,...",
                      help="one example's input shape for a module:factory model, e.g. 3,224,224")
    proj.add_argument("--input-dtype", choices=["float", "long"], default="float",
                      help="input dtype of the meta forward pass (long for token ids)")
    proj.add_argument("--batch", type=int, default=None, help="examples per step (default: the workload's)")
    proj.add_argument("--hardware", default=DEFAULT_THERMO, metavar="PRESET",
                      help=f"thermodynamic device preset: {', '.join(THERMO_PRESETS)}")
    proj.add_argument("--digital", default=DEFAULT_DIGITAL, metavar="PRESET",
                      help=f"digital device preset: {', '.join(DIGITAL_PRESETS)} (cpu = measured host)")
    proj.add_argument("--calibration", default=None, metavar="PATH",
                      help="calibration JSON for the cpu/cuda presets (default: the preset's file)")
    proj.add_argument("--method", choices=THERMO_METHODS, default="best",
                      help="thermodynamic method: invert the factors, solve with the gradient as "
                           "right-hand side, or the cheaper per layer")
    proj.add_argument("--kappa", type=float, default=DEFAULT_KAPPA,
                      help="condition number of the damped factors")
    proj.add_argument("--eps", type=float, default=DEFAULT_EPS,
                      help="target relative error of analog results")
    proj.add_argument("--bits", type=int, default=None,
                      help="coupling, DAC and ADC bits, all three (default: each the device's own; the "
                           "JSON lists them under assumptions.converter_bits)")
    proj.add_argument("--cells", type=int, default=None, help="override: cells per solver unit")
    proj.add_argument("--units", type=int, default=None, help="override: solver units in parallel")
    proj.add_argument("--tau", type=float, default=None, help="override: tau = RC in seconds")
    proj.add_argument("--bandwidth", type=bandwidth_gbps, default=None, metavar="GBPS",
                      help="override: host link in Gb/s, or with a unit (400Gb/s, 4e11b/s)")
    proj.add_argument("--kappa0", type=float, default=None,
                      help="override: thermal noise 1/beta in the simulator's convention (lambda_max-"
                           "normalised matrix, full-scale inputs)")
    proj.add_argument("--oversize", choices=OVERSIZE_POLICIES, default=None,
                      help="override: factors larger than the cells are refused (stay digital) or "
                           "split into diagonal blocks (an approximation)")
    proj.add_argument("--resident", action="store_true",
                      help="solve method: factors stay programmed between inverse updates")
    proj.add_argument("--factor-every", type=int, default=1, help="K-FAC factor update period (steps)")
    proj.add_argument("--inverse-every", type=int, default=10, help="K-FAC inverse update period (steps)")
    proj.add_argument("--digital-method", choices=DIGITAL_METHODS, default="eigh",
                      help="how digital K-FAC inverts its factors")
    proj.add_argument("--precision", choices=PRECISIONS, default="fp32",
                      help="GEMM precision of forward/backward and factor statistics")
    proj.add_argument("--nongemm-factor", type=float, default=1.5,
                      help="forward+backward time / its GEMM time (norms, activations, data movement)")
    proj.add_argument("--sweep", choices=SWEEP_AXES, default=None,
                      help="sweep one axis instead (width: one square layer; others: the model's step; "
                           "precision values are indices into fp32,tf32,bf16,fp64)")
    proj.add_argument("--values", default=None, metavar="X,X,...",
                      help="sweep values (bandwidth in Gb/s or with a unit, as --bandwidth; default: a "
                           "log grid per axis)")
    proj.add_argument("--analog-time", type=float, default=None, metavar="K",
                      help="price a fixed averaging window of K tau per analog job (accuracy reported "
                           "from the error law) instead of the window --eps needs")
    proj.add_argument("--burn-in", type=float, default=None, metavar="T",
                      help="fixed burn-in in tau (default: chosen with --eps, 0 with --analog-time)")
    proj.add_argument("--start", choices=["zero", "gradient", "previous", "stationary"], default="zero",
                      help="warm start of the analog solves")
    proj.add_argument("--overlap", action="store_true",
                      help="analog solves of step t run while step t+1 computes (step = max of both)")
    proj.add_argument("--devices", type=int, default=1,
                      help="thermodynamic devices sharing the layers (their analog work runs in parallel)")
    proj.add_argument("--scenario", choices=SCENARIOS, default="default",
                      help="paper: our reading of the seed paper's assumptions, beside the default "
                           "scenario, with a verdict and a requirements table")
    proj.add_argument("--steps-ratio", type=float, default=DEFAULT_STEPS_RATIO,
                      help="K-FAC's steps to a target / Adam's (time-to-result comparison with Adam)")
    proj.add_argument("--steps-ratio-from", default=None, metavar="RUN/results.json",
                      help="take the steps ratio measured by `compare` (thermodynamic K-FAC's steps to "
                           "the run's target loss / Adam's), shown beside the assumed --steps-ratio")
    proj.add_argument("--trace", default=None, metavar="RUN/trace.json",
                      help="price exactly the solves listed in a training run's trace file")
    proj.add_argument("--spectra-from", default=None, metavar="RUN/trace.json",
                      help="apply the measured kappa-vs-width of a trace to --model (power-law fit)")
    proj.add_argument("--map", choices=MAP_KINDS, default=None,
                      help="2-D break-even map of one square layer (with --csv / --plot / --json)")
    proj.add_argument("--all-layers", action="store_true", help="one table row per layer (no grouping)")
    proj.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    proj.add_argument("--csv", default=None, metavar="PATH",
                      help="write per-layer rows (sweep points, map cells) as CSV; not with --trace "
                           "or --scenario paper")
    proj.add_argument("--plot", default=None, metavar="PATH",
                      help="write a PNG plot; not with --trace or --scenario paper")
    executors.add_arguments(proj)  # --sweep points as parallel tasks
    proj.set_defaults(func=run_project)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``calibrate``/``project`` without the rest of the CLI (used by tests and scripts)."""
    from thermo_kfac import cli  # the CLI imports this module; import it lazily

    return cli.main(argv, modules=[__name__])


if __name__ == "__main__":
    sys.exit(main())
