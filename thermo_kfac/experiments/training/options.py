"""Optimizer specs and their options: the schema, the defaults, parsing and resolution.

A spec is ``name[:key=value,key=value]``, e.g. ``adam:lr=3e-3`` or
``kfac:solver=cholesky,damping=0.1``. For ``kfac``, keys that are neither K-FAC nor base-optimizer
options are passed to the solver as ``solver_options`` (validated by the solver). The choices of
the K-FAC options come from the library (:mod:`thermo_kfac.fisher`, :mod:`thermo_kfac.capture`,
:mod:`thermo_kfac.solvers.kronecker_svd`, :mod:`thermo_kfac.preconditioner`), so they cannot drift.

``kfac-adaptive`` (:class:`thermo_kfac.KFAC`: adaptive damping, quadratic-model lr and momentum)
has its own keys (:data:`ADAPTIVE_OPTIONS`; any other key is a solver option), turned into typed
``KFAC`` arguments by :func:`parse_adaptive_options` and validated when the optimizer is built; no
CLI flag applies to it. Every spec is read with the one option grammar, :mod:`thermo_kfac.grammar`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_THERMO
from hw_models.devices import DIGITAL_PRESETS, THERMO_PRESETS
from hw_models.validation import check_choice, check_number
from thermo_kfac.capture import KFAC_APPROXIMATIONS
from thermo_kfac.defaults import BASE_OPTIMIZER_DEFAULTS, KFAC_DEFAULTS
from thermo_kfac.fisher import FISHER_TYPES, LOSSES
from thermo_kfac.grammar import (
    DTYPES,
    parse_bool,
    parse_dtype,
    parse_items,
    parse_optional_float,
    parse_value,
)
from thermo_kfac.kld_wrm import VARIANTS as KLD_VARIANTS
from thermo_kfac.preconditioner import FACTOR_DTYPES as PRECONDITIONER_FACTOR_DTYPES
from thermo_kfac.solvers.kronecker_svd import CURVATURES

__all__ = ["ADAPTIVE", "ADAPTIVE_OPTIONS", "BASE_OPTIMIZERS", "DEFAULT_BATCH_SIZE", "DEFAULT_EPOCHS",
           "EVAL_POINTS", "FACTOR_DTYPES", "FISHER_TYPES", "KFAC_ADAM_LR", "LOSSES", "OPTIMIZERS",
           "OPTIMIZER_DEFAULTS", "OPTIONS", "TASK_LOSSES", "Option", "OptimizerSpec", "check_option",
           "parse_adaptive_options", "parse_optimizer_spec", "resolve_options", "solver_option_hint"]

OPTIMIZERS = ("sgd", "adam", "kfac", "adafisher", "eva", "kld-wrm")
# thermo_kfac.KFAC: its own k=v options (ADAPTIVE_OPTIONS below), not in OPTIONS.
ADAPTIVE = "kfac-adaptive"
BASE_OPTIMIZERS = ("sgd", "adam")
# Losses that make sense for each task of thermo_kfac.data (a choice of the experiments).
TASK_LOSSES = {"classification": ("cross_entropy",), "regression": ("mse",), "autoencoder": ("bce", "mse")}
# The preconditioner's factor dtypes by their names (of the one dtype map, thermo_kfac.grammar.DTYPES).
FACTOR_DTYPES: dict[str, torch.dtype] = {n: d for n, d in DTYPES.items() if d in PRECONDITIONER_FACTOR_DTYPES}

_KINDS = {float: "a number", int: "an integer", parse_bool: "true or false",
          parse_optional_float: "a number or none"}


@dataclass(frozen=True)
class Option:
    """One optimizer option: how to parse it from text, which optimizers take it, its range."""

    parse: Callable[[Any], Any]
    help: str
    optimizers: tuple[str, ...]
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    integer: bool = False


# Options of the optimizer specs; the CLI flags of the same name (``--factor-decay`` ...) set
# them for every run that takes them.
OPTIONS: dict[str, Option] = {
    "lr": Option(float, "learning rate", OPTIMIZERS, low=0.0, low_inclusive=False),
    "momentum": Option(float, "SGD momentum (sgd, kfac with base sgd, eva, kld-wrm)",
                       ("sgd", "kfac", "eva", "kld-wrm"), low=0.0,
                       high=1.0, high_inclusive=False),
    "weight_decay": Option(float, "L2 weight decay", OPTIMIZERS, low=0.0),
    "beta1": Option(float, "Adam beta1", ("adam", "kfac"), low=0.0, high=1.0, high_inclusive=False),
    "beta2": Option(float, "Adam beta2", ("adam", "kfac"), low=0.0, high=1.0, high_inclusive=False),
    "eps": Option(float, "Adam epsilon", ("adam", "kfac"), low=0.0, low_inclusive=False),
    "base": Option(str, "optimizer that applies K-FAC's preconditioned gradient", ("kfac",),
                   choices=BASE_OPTIMIZERS),
    "damping": Option(float, "Tikhonov damping of each Kronecker block",
                      ("kfac", "adafisher", "eva", "kld-wrm"),
                      low=0.0),
    "pi_damping": Option(parse_bool, "factored pi-damping (true/false)", ("kfac",)),
    "factor_decay": Option(float, "EMA decay of the factors", ("kfac",), low=0.0, high=1.0,
                           high_inclusive=False),
    "factor_update_every": Option(int, "update the factors every N steps", ("kfac",), low=1, integer=True),
    "inverse_update_every": Option(int, "re-factorize every N steps", ("kfac",), low=1, integer=True),
    "fisher_type": Option(str, "curvature estimate", ("kfac",), choices=FISHER_TYPES),
    "kl_clip": Option(parse_optional_float, "KL clipping bound (none disables)", ("kfac", "eva", "kld-wrm"),
                      low=0.0,
                      low_inclusive=False),
    "solver": Option(str, "per-layer Kronecker solver (or the rules auto, fits)", ("kfac",)),
    "solver_map": Option(str, "per-layer solvers 'pattern=spec;...' or a JSON file", ("kfac",)),
    "hardware": Option(str, "thermodynamic preset for auto/fits and predicted times", ("kfac",),
                       choices=THERMO_PRESETS),
    "digital": Option(str, "digital preset for auto and predicted times", ("kfac",), choices=DIGITAL_PRESETS),
    "factor_dtype": Option(str, "dtype of the factors", ("kfac",), choices=tuple(FACTOR_DTYPES)),
    # AdaFisher and Eva (thermo_kfac/adafisher.py, thermo_kfac/eva.py; docs/adafisher_eva.md)
    "beta": Option(float, "AdaFisher first-moment EMA", ("adafisher",), low=0.0, high=1.0,
                   high_inclusive=False),
    "gamma1": Option(float, "AdaFisher factor EMA: X <- (1 - gamma1) X + gamma2 X_new", ("adafisher",),
                     low=0.0, high=1.0, low_inclusive=False),
    "gamma2": Option(float, "AdaFisher factor EMA weight of the new statistics", ("adafisher",), low=0.0,
                     high=1.0, low_inclusive=False),
    "decoupled_weight_decay": Option(parse_bool, "AdaFisherW: decoupled weight decay (true/false)",
                                     ("adafisher",)),
    "update_every": Option(int, "refresh the curvature statistics every N steps",
                           ("adafisher", "eva", "kld-wrm"),
                           low=1, integer=True),
    "stat_decay": Option(float, "EMA decay (Eva: Kronecker vectors; kld-wrm: factors and wake)",
                         ("eva", "kld-wrm"), low=0.0, high=1.0,
                         high_inclusive=False),
    "kfac_approx": Option(str, "K-FAC flavour for weight sharing (expand/reduce)", ("kfac",),
                          choices=KFAC_APPROXIMATIONS),
    "curvature": Option(str, "curvature block: kfac, or a Kronecker-SVD approximation", ("kfac",),
                        choices=CURVATURES),
    "kld_variant": Option(str, "KLD-WRM instantiation (thermo_kfac.kld_wrm)", ("kld-wrm",),
                          choices=KLD_VARIANTS),
}

#: Keys of the ``kfac-adaptive`` spec (``kfac-adaptive:key=value,...``) that configure
#: :class:`thermo_kfac.KFAC` itself; ``lr``/``momentum`` take a number or ``auto``/``none``
#: (adapted). Any other key is a solver option (as for the ``kfac`` spec).
ADAPTIVE_OPTIONS: dict[str, str] = {
    "lr": "fixed learning rate (auto: quadratic model)",
    "momentum": "fixed momentum (auto: quadratic model)",
    "damping": "initial damping lambda",
    "adapt_damping": "Levenberg-Marquardt adaptation of lambda (true/false)",
    "damping_adaptation_every": "steps between damping adaptations (T1)",
    "damping_decay": "omega = damping_decay ** T1",
    "min_damping": "lower bound of lambda",
    "max_damping": "upper bound of lambda",
    "max_momentum": "upper bound of an adapted momentum",
    "weight_decay": "L2 coefficient eta (also added to the damping)",
    "curvature_examples": "examples of the batch used for the curvature products (none: all)",
    "loss_dtype": "float64 (default), float32 or none: dtype of the loss and its output gradient",
    "fisher_type": "empirical, mc or type2",
    "factor_decay": "EMA decay of the Kronecker factors",
    "factor_update_every": "update the factors every N steps",
    "inverse_update_every": "re-prepare the solvers every N steps",
    "solver": "per-layer Kronecker solver (eigh, cholesky, sre, rsvd, cg, thermo, ...)",
    "pi_damping": "pi split of the factored damping (true/false)",
    "factor_dtype": "float32 or float64",
}

# Defaults per optimizer. kfac's K-FAC and base-optimizer values are the library's
# (thermo_kfac.defaults, the one source; docs/preconditioner.md has the table).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "kfac": {"base": "sgd", **BASE_OPTIMIZER_DEFAULTS["sgd"], "weight_decay": 0.0, "beta1": 0.9,
             "beta2": 0.999, "eps": 1e-8, **KFAC_DEFAULTS, "factor_dtype": "float32", "solver_map": None,
             "hardware": DEFAULT_THERMO, "digital": DEFAULT_DIGITAL, "kfac_approx": "expand",
             "curvature": "kfac"},
}
# AdaFisher: the authors' defaults (lr, beta, lambda, T_cov = 100, EMA pair of their code).
OPTIMIZER_DEFAULTS["adafisher"] = {"lr": 1e-3, "beta": 0.9, "gamma1": 0.92, "gamma2": 0.008, "damping": 1e-3,
                                   "update_every": 100, "weight_decay": 0.0, "decoupled_weight_decay": False}
# Eva: the paper's defaults (SGD momentum 0.9 as in its experiments).
OPTIMIZER_DEFAULTS["eva"] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "damping": 0.03,
                             "kl_clip": 1e-3, "stat_decay": 0.95, "update_every": 1}
# KLD-WRM: lr is 1/lambda; its steady-state step is (1 - rho) lr F^-1 g, so lr 6 = K-FAC's 0.3 at rho 0.95.
OPTIMIZER_DEFAULTS["kld-wrm"] = {"lr": 6.0, "momentum": 0.5, "weight_decay": 0.0, "damping": 0.1,
                                 "kl_clip": 1e-3, "stat_decay": 0.95, "update_every": 1, "kld_variant": "so"}
# Learning rate of kfac when its base optimizer is Adam (unless lr is given).
KFAC_ADAM_LR = BASE_OPTIMIZER_DEFAULTS["adam"]["lr"]
DEFAULT_EPOCHS = {"digits": 40}
DEFAULT_BATCH_SIZE = 256
EVAL_POINTS = 200  # default evaluations per run (time-to-target resolution)


@dataclass
class OptimizerSpec:
    """A parsed optimizer spec ``name[:key=value,...]``.

    ``options`` holds the explicitly given values (typed); ``solver_options`` the kfac keys that
    are passed on to the solver; ``text`` the spec as written (the run's label).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    solver_options: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def label(self) -> str:
        return self.text or self.name


def check_option(key: str, value: Any, context: str = "") -> Any:
    """``value`` of the option ``key`` parsed and checked against :data:`OPTIONS` (its type,
    choices and range); raises ``ValueError`` starting with ``context`` otherwise."""
    option = OPTIONS[key]
    try:
        parsed = option.parse(value)
    except (TypeError, ValueError):
        kind = _KINDS.get(option.parse, "text")
        raise ValueError(f"{context}{key}={value!r} must be {kind}") from None
    if parsed is None:
        return None
    if option.choices is not None:
        return check_choice(f"{context}{key}", parsed, option.choices)
    if isinstance(parsed, int | float) and not isinstance(parsed, bool):
        return check_number(f"{context}{key}", parsed, low=option.low, high=option.high,
                            low_inclusive=option.low_inclusive, high_inclusive=option.high_inclusive,
                            integer=option.integer)
    return parsed


def parse_optimizer_spec(text: str | OptimizerSpec) -> OptimizerSpec:
    """Parse ``name[:key=value,key=value]`` (keys may use ``-`` or ``_``) into an :class:`OptimizerSpec`.

    Raises ``ValueError`` naming the bad name, key or value and what is allowed.
    """
    if isinstance(text, OptimizerSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"optimizer spec {text!r} is empty; use name[:key=value,...] with name one of "
                         f"{', '.join(OPTIMIZERS)}")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    check_choice("optimizer", name, OPTIMIZERS + (ADAPTIVE,))
    spec = OptimizerSpec(name, text=text.strip())
    context = f"optimizer spec {text!r}: "
    for key, value in parse_items(rest, context).items():
        if name == ADAPTIVE:  # validated when the optimizer is built
            (spec.options if key in ADAPTIVE_OPTIONS else spec.solver_options)[key] = value
            continue
        option = OPTIONS.get(key)
        if option is not None and name in option.optimizers:
            spec.options[key] = check_option(key, value, context)
        elif name == "kfac" and option is None:
            spec.solver_options[key] = parse_value(value)
        else:
            valid = sorted(k for k, o in OPTIONS.items() if name in o.optimizers)
            extra = " (other keys are passed to the solver)" if name == "kfac" else ""
            raise ValueError(f"{context}{name} has no option {key!r}; valid: {', '.join(valid)}{extra}")
    return spec


def resolve_options(spec: OptimizerSpec, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full option dict of a run: defaults < ``overrides`` (CLI flags) < the spec's own options."""
    options = dict(OPTIMIZER_DEFAULTS.get(spec.name, {"solver": "eigh"}))  # kfac-adaptive: its own
    given = {k: v for k, v in (overrides or {}).items() if spec.name in OPTIONS[k].optimizers}
    if spec.name == "kfac" and spec.options.get("base", given.get("base", options["base"])) == "adam":
        options["lr"] = KFAC_ADAM_LR
    options.update(given)
    options.update(spec.options)
    if spec.name in ("kfac", ADAPTIVE) and spec.solver_options:
        options["solver_options"] = dict(spec.solver_options)
    return options


def solver_option_hint(spec: OptimizerSpec) -> str:
    """For unknown kfac (or kfac-adaptive) keys (taken as solver options): the valid keys of the
    optimizer, and close matches."""
    if not spec.solver_options:
        return ""
    valid = list(ADAPTIVE_OPTIONS) if spec.name == ADAPTIVE else \
        [k for k, o in OPTIONS.items() if "kfac" in o.optimizers]
    close = {k: difflib.get_close_matches(k, valid, n=1) for k in spec.solver_options}
    guesses = [f"{k!r} -> {m[0]!r}" for k, m in close.items() if m]
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return (f"{hint}; keys that are not {spec.name} options ({', '.join(valid)}) are passed to the "
            "solver as solver_options")


def parse_adaptive_options(options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Typed :class:`thermo_kfac.KFAC` keyword arguments of ``kfac-adaptive`` options, given as
    ``"key=value,key=value"`` or a dict (values as text or typed).

    Keys of :data:`ADAPTIVE_OPTIONS` become arguments (``auto``/``none`` for ``lr``/``momentum``
    means adapted; dtypes by name); other keys are collected into ``solver_options``. Text values
    are read by :func:`thermo_kfac.grammar.parse_value`; ``KFAC`` validates the rest.
    """
    if options is None:
        return {}
    items = parse_items(options, f"kfac-adaptive options {options!r}: ") if isinstance(options, str) \
        else {str(k).strip().replace("-", "_"): v for k, v in options.items()}
    kwargs: dict[str, Any] = {}
    solver_options: dict[str, Any] = {}
    for key, value in items.items():
        if not key or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"kfac-adaptive option {key!r}: expected key=value")
        parsed = parse_value(value) if isinstance(value, str) else value
        if key in ("lr", "momentum") and isinstance(parsed, str) and parsed.lower() == "auto":
            parsed = None
        if key in ("factor_dtype", "loss_dtype") and (parsed is None or isinstance(parsed, str)):
            parsed = parse_dtype(key, parsed, allow_none=key == "loss_dtype")
        (kwargs if key in ADAPTIVE_OPTIONS else solver_options)[key] = parsed
    if solver_options:
        kwargs["solver_options"] = solver_options
    return kwargs
