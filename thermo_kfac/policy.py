"""Per-layer solver policy and the predicted hardware time of the all-digital and hybrid machines.

A :class:`SolverPolicy` decides which solver serves each registered K-FAC layer:

1. **rules**, in the order given, first match wins: a pattern is a regular expression searched
   (``re.search``) in the layer's qualified name, or matched in full against its module type
   name (``"Conv2d"``, ``"Linear"``); the value is a solver spec;
2. otherwise the **default** (``None``: the preconditioner's ``solver=`` / ``solver_options=``).

A solver spec is a registered solver name with options, typed (``SolverSpec("thermo", {"bits":
8})``) or written as on the command line (``"eigh"``, ``"thermo:bits=8,analog_time=20"``, read by
:mod:`thermo_kfac.grammar`), a dict (``{"solver": "thermo", "bits": 8}``),
a :class:`~thermo_kfac.solvers.KFACSolver` subclass or prototype instance, or one of two rules:

- ``"fits"``: the analog solver if both damped factors fit the thermodynamic device
  (``max(n_A, n_G) <= cells`` of the ``hardware`` preset), else the digital solver;
- ``"auto"``: whichever is cheaper per training step for this layer on the chosen presets,
  priced by :func:`thermo_kfac.layer_pricing.price_layer` (:mod:`hw_models.pricing`), the
  analog side at the window the error law needs for the policy's ``eps``. The first choice uses
  the geometric model spectrum at the policy's nominal ``kappa``; from then on the layer's
  :class:`~thermo_kfac.layer_pricing.AutoSolver` re-decides at every inverse update from the
  measured damped-factor spectra, with hysteresis (``auto_margin``, ``auto_patience``); a layer
  that does not fit the device stays digital.

Options given to a rule (``"auto:bits=8"``) configure its analog solver. The thermodynamic
solver built by a policy prices its reports on the policy's ``hardware`` / ``digital`` presets
unless its spec sets ``device`` / ``host``.

:class:`HardwarePricer` turns an assignment into predicted seconds per training step of the
*all-digital* machine (every layer's curvature work on the digital preset) and of the *hybrid*
machine (analog layers on the thermodynamic device, the rest digital), periodic work amortized
over the preconditioner's ``factor_update_every`` / ``inverse_update_every``. An analog layer's
hybrid time is its factor statistics plus exactly what its solver reported (prepare amortized,
apply every step); nothing in this module prices hardware except through
:mod:`hw_models.pricing`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hw_models import pricing
from hw_models.cost import KFACSchedule
from hw_models.devices import DigitalDevice, ThermoDevice, digital_device, thermo_device
from hw_models.layer_cost import DEFAULT_DIGITAL, DEFAULT_EPS, DEFAULT_KAPPA, DEFAULT_THERMO
from hw_models.units import format_seconds
from hw_models.validation import check_number, check_positive
from thermo_kfac.grammar import format_spec, parse_solver_map, parse_spec
from thermo_kfac.layer_pricing import price_digital_layer, price_layer
from thermo_kfac.solvers.auto import AutoSolver
from thermo_kfac.solvers.base import (
    KFACSolver,
    SolverFactory,
    available_solvers,
    registered_solver,
    solver_factory,
)

#: Spec names that are rules resolved per layer rather than solvers.
RULES = ("auto", "fits")


@dataclass(frozen=True)
class SolverSpec:
    """One solver spec: a registered name (or rule) with options, or a solver class/instance."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    solver: KFACSolver | type[KFACSolver] | None = None

    @classmethod
    def parse(cls, value: Any, options: Mapping[str, Any] | None = None) -> SolverSpec:
        """Read ``"name[:key=value,...]"``, a dict ``{"solver": name, key: value}``, a solver
        class or instance, or a :class:`SolverSpec`; ``options`` are merged in (spec wins)."""
        extra = dict(options or {})
        if isinstance(value, SolverSpec):
            spec = value
        elif isinstance(value, KFACSolver) or (isinstance(value, type) and issubclass(value, KFACSolver)):
            spec = SolverSpec(value.name, {}, value)
        elif isinstance(value, Mapping):
            opts = {str(k).replace("-", "_"): v for k, v in value.items()}
            name = opts.pop("solver", opts.pop("name", None))
            if not isinstance(name, str):
                raise ValueError(f"solver spec {dict(value)!r} needs a 'solver' key naming the solver "
                                 f"({', '.join(_valid_names())})")
            spec = SolverSpec(name.strip(), opts)
        elif isinstance(value, str) and value.strip():
            spec = SolverSpec(*parse_spec(value, f"solver spec {value!r}: "))
        else:
            raise ValueError(f"solver spec {value!r} is not valid; use a solver name "
                             f"({', '.join(_valid_names())}) with optional ':key=value,...', a dict "
                             "{'solver': name, ...}, or a KFACSolver subclass or instance")
        if spec.solver is None and spec.name not in RULES and spec.name not in available_solvers():
            raise ValueError(f"solver={spec.name!r} is not valid; choose one of: "
                             f"{', '.join(_valid_names())}")
        if extra:
            if spec.solver is not None and isinstance(spec.solver, KFACSolver):
                raise ValueError("solver_options cannot be combined with a solver instance; "
                                 "configure the instance instead")
            spec = SolverSpec(spec.name, {**extra, **spec.options}, spec.solver)
        return spec

    @property
    def is_rule(self) -> bool:
        return self.solver is None and self.name in RULES

    @property
    def text(self) -> str:
        """The spec as written on the command line (``thermo:bits=8``)."""
        return format_spec(self.name, self.options)

    def factory(self) -> SolverFactory:
        """Per-layer solver factory (validates the options); rules have none."""
        if self.is_rule:
            raise ValueError(f"solver rule {self.name!r} is resolved per layer by a SolverPolicy")
        return solver_factory(self.solver if self.solver is not None else self.name,
                              self.options or None)

    def solver_class(self) -> type[KFACSolver] | None:
        if isinstance(self.solver, KFACSolver):
            return type(self.solver)
        if isinstance(self.solver, type):
            return self.solver
        return registered_solver(self.name)


def _valid_names() -> list[str]:
    return [*available_solvers(), *RULES]


def is_analog(solver: KFACSolver) -> bool:
    """Whether ``solver`` runs on the (simulated) thermodynamic device (:attr:`KFACSolver.analog`)."""
    return solver.analog


@dataclass(frozen=True)
class LayerAssignment:
    """The solver chosen for one layer and why."""

    layer: str
    module_type: str
    factor_sizes: tuple[int, int]  # (n_A incl. bias column, n_G)
    spec: SolverSpec
    reason: str
    label: str = ""  # the spec as chosen, before the policy's presets were filled in

    @property
    def solver(self) -> str:
        return self.spec.name

    @property
    def text(self) -> str:
        return self.label or self.spec.text

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "type": self.module_type, "factor_sizes": list(self.factor_sizes),
                "solver": self.solver, "spec": self.text, "reason": self.reason}


@dataclass(frozen=True)
class SolverPolicy:
    """Which solver serves each layer (module docs).

    Args:
        rules: ``{pattern: spec}`` or ``[(pattern, spec), ...]``, first match wins.
        default: spec for layers no rule matches; None uses the preconditioner's ``solver=``.
        hardware: thermodynamic preset (or device) for ``fits``/``auto`` and pricing.
        digital: digital preset (or device) for ``auto`` and pricing.
        analog: solver that ``fits``/``auto`` put on the device (options of the rule merge in).
        digital_solver: solver that ``fits``/``auto`` keep digital.
        kappa, eps: nominal condition number of the damped factors (the first ``auto`` choice and
            analog layers before their solver reports) and the target relative error of an analog
            solver that states no window.
        auto_margin, auto_patience: ``auto``'s hysteresis: a layer changes sides only when the
            other is cheaper by ``auto_margin`` (relative) at ``auto_patience`` consecutive updates.
    """

    rules: Any = ()
    default: Any = None
    hardware: str | ThermoDevice = DEFAULT_THERMO
    digital: str | DigitalDevice = DEFAULT_DIGITAL
    analog: Any = "thermo"
    digital_solver: Any = "eigh"
    kappa: float = DEFAULT_KAPPA
    eps: float = DEFAULT_EPS
    auto_margin: float = 0.2
    auto_patience: int = 2

    def __post_init__(self) -> None:
        items = self.rules.items() if isinstance(self.rules, Mapping) else self.rules
        if isinstance(items, str) or not isinstance(items, Iterable):
            raise ValueError(f"rules={self.rules!r} must be a dict {{pattern: spec}} or a list of "
                             "(pattern, spec) pairs")
        rules = []
        for item in items:
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"solver rule {item!r} must be a (pattern, spec) pair")
            pattern, spec = item
            try:
                compiled = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"solver map pattern {pattern!r} is not a valid regular expression: "
                                 f"{err}") from None
            rules.append((compiled, SolverSpec.parse(spec)))
        object.__setattr__(self, "rules", tuple(rules))
        if self.default is not None:
            object.__setattr__(self, "default", SolverSpec.parse(self.default))
        analog = SolverSpec.parse(self.analog)
        digital_spec = SolverSpec.parse(self.digital_solver)
        for role, spec in (("analog", analog), ("digital_solver", digital_spec)):
            if spec.is_rule:
                raise ValueError(f"{role}={spec.name!r} must be a solver, not a rule ({', '.join(RULES)})")
        object.__setattr__(self, "analog", analog)
        object.__setattr__(self, "digital_solver", digital_spec)
        object.__setattr__(self, "hardware", thermo_device(self.hardware))
        object.__setattr__(self, "digital", digital_device(self.digital))
        check_number("kappa", self.kappa, low=1.0)
        check_number("eps", self.eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_number("auto_margin", self.auto_margin, low=0.0, high=1.0, high_inclusive=False)
        check_positive("auto_patience", self.auto_patience, integer=True)
        for spec in [s for _, s in rules] + ([self.default] if self.default is not None else []):
            self.validate(spec)

    def validate(self, spec: SolverSpec) -> None:
        """Raise ``ValueError`` if the solver a spec stands for rejects its options."""
        self._bind(self._analog_for(spec) if spec.is_rule else spec).factory()

    def _analog_for(self, rule: SolverSpec) -> SolverSpec:
        """The analog solver of a rule: the policy's, with the rule's options merged in."""
        return SolverSpec(self.analog.name, {**self.analog.options, **rule.options}, self.analog.solver)

    @classmethod
    def coerce(cls, value: Any) -> SolverPolicy:
        """A policy from None (no rules), a ``{pattern: spec}`` dict, a pair list, a policy, or a
        solver map as text (:func:`thermo_kfac.grammar.parse_solver_map`)."""
        if isinstance(value, SolverPolicy):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(rules=parse_solver_map(value))
        return cls(rules=value)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"rules": [[p.pattern, s.text] for p, s in self.rules],
                "default": None if self.default is None else self.default.text,
                "hardware": self.hardware.name, "digital": self.digital.name,
                "analog": self.analog.text, "digital_solver": self.digital_solver.text,
                "kappa": self.kappa, "eps": self.eps, "auto_margin": self.auto_margin,
                "auto_patience": self.auto_patience}

    # ------------------------------------------------------------------------------ assignment
    def match(self, name: str, module_type: str) -> tuple[int, SolverSpec] | None:
        """``(rule index, spec)`` of the first rule matching the layer, or None."""
        for index, (pattern, spec) in enumerate(self.rules):
            if pattern.search(name) or pattern.fullmatch(module_type):
                return index, spec
        return None

    def assign(self, name: str, module_type: str, n_a: int, n_g: int, *, has_bias: bool = True,
               default: SolverSpec | None = None, schedule: KFACSchedule | None = None
               ) -> LayerAssignment:
        """The solver of one layer with factor sizes ``n_a`` (bias column included) and ``n_g``."""
        matched = self.match(name, module_type)
        if matched is not None:
            index, spec = matched
            source = f"rule {self.rules[index][0].pattern!r}"
        else:
            spec = self.default or default or SolverSpec("eigh")
            source = "default"
        sizes = (int(n_a), int(n_g))
        if not spec.is_rule:
            return LayerAssignment(name, module_type, sizes, self._bind(spec), source, spec.text)
        chosen = self._analog_for(spec)
        analog = self._bind(chosen)
        digital = self.digital_solver
        cells = self.hardware.cells
        if spec.name == "fits":
            fits = pricing.fits(max(sizes), self.hardware)
            relation = "<=" if fits else ">"
            reason = f"{source}, fits: max({sizes[0]}, {sizes[1]}) {relation} {cells} cells"
            pick, label = (analog, chosen.text) if fits else (digital, digital.text)
            return LayerAssignment(name, module_type, sizes, pick, reason, label)
        if max(sizes) > cells and self.hardware.oversize == "refuse":
            reason = f"{source}, auto: factor > {cells} cells"
            return LayerAssignment(name, module_type, sizes, digital, reason)
        thermo_s, digital_s = self.layer_costs(analog, digital, sizes, has_bias, schedule)
        on_analog = thermo_s is not None and thermo_s < digital_s
        pick, label = (analog, chosen.text) if on_analog else (digital, digital.text)
        if thermo_s is None:  # fits, but the law says eps is out of reach at the nominal kappa
            priced = f"{analog.name} cannot reach eps {self.eps:g}"
        else:
            priced = (f"{analog.name} {format_seconds(thermo_s)} {'<' if on_analog else '>='} "
                      f"{digital.name} {format_seconds(digital_s)} per step")
        reason = (f"{source}, auto: {priced} at kappa {self.kappa:g} (re-decided at each inverse "
                  "update from the measured spectra)")
        auto = AutoSolver(analog.factory()(), digital.factory()(), hardware=self.hardware,
                          host=self.digital, n_a=sizes[0], n_g=sizes[1],
                          initial="analog" if on_analog else "digital", eps=self.eps,
                          inverse_every=(schedule or KFACSchedule()).inverse_every,
                          margin=self.auto_margin, patience=self.auto_patience)
        return LayerAssignment(name, module_type, sizes, SolverSpec(pick.name, {}, auto),
                               reason, label)

    def layer_costs(self, analog: SolverSpec, digital: SolverSpec, sizes: tuple[int, int],
                    has_bias: bool, schedule: KFACSchedule | None, batch: int = 1
                    ) -> tuple[float | None, float]:
        """``(thermo seconds or None if it does not fit, digital seconds)`` of one layer's solver
        work per step (:func:`~thermo_kfac.layer_pricing.price_layer`, the model spectrum at
        ``kappa``, the analog side at the window the law needs for ``eps``, as ``auto`` decides).
        The factor statistics cost the same on both sides and are left out; ``has_bias`` and
        ``batch`` are kept for callers."""
        schedule = schedule or KFACSchedule()
        settings = analog.factory()().pricing_settings()
        method = digital.factory()().digital_method
        return price_layer(settings, method, sizes[0], sizes[1], hardware=self.hardware,
                           digital=self.digital, kappa=self.kappa, eps=self.eps,
                           inverse_every=schedule.inverse_every, precision=schedule.precision,
                           accuracy="eps")

    def _bind(self, spec: SolverSpec) -> SolverSpec:
        """Give a thermodynamic-style solver the policy's presets unless its spec sets them."""
        cls = spec.solver_class()
        if spec.solver is not None or cls is None:
            return spec
        presets = {"thermo": self.hardware.name, "digital": self.digital.name}
        options = dict(spec.options)
        for option, preset in cls.preset_options.items():
            options.setdefault(option, presets[preset])
        return SolverSpec(spec.name, options) if options != spec.options else spec


def format_assignment(assignments: Iterable[LayerAssignment],
                      solvers: Mapping[str, KFACSolver] | None = None) -> str:
    """A small terminal table: layer, type, factor sizes, solver spec, reason.

    With ``solvers`` (``{layer: solver}``, e.g. from ``precond.layer_table``), an ``auto`` layer's
    row shows its latest decision: measured kappa of A and G, predicted analog and digital seconds
    per step and the current choice.
    """
    rows = [["layer", "type", "A x G", "solver", "why"]]
    for a in assignments:
        solver = (solvers or {}).get(a.layer)
        text, why = a.text, a.reason
        if isinstance(solver, AutoSolver):
            text, why = solver.current.name, solver.describe()
        rows.append([a.layer, a.module_type, f"{a.factor_sizes[0]} x {a.factor_sizes[1]}", text, why])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ pricing
class HardwarePricer:
    """Predicted curvature seconds per training step of the all-digital and the hybrid machine.

    Per layer, both machines pay the factor statistics (two GEMMs per factor update on the
    digital preset). The all-digital machine adds the layer's digital solver work
    (:func:`~thermo_kfac.layer_pricing.price_layer`: decompositions amortized over
    ``inverse_every``, preconditioning GEMMs every step). The hybrid machine adds, for an analog
    layer, exactly what its solver reported: ``prepare / inverse_every + apply`` (before the first
    report: :func:`price_layer` with the solver's settings at the policy's nominal ``kappa``).
    Model prices depend only on sizes, rows and settings, so they are cached.
    """

    def __init__(self, policy: SolverPolicy, schedule: KFACSchedule) -> None:
        self.policy = policy
        self.schedule = schedule
        self._rows: dict[str, int] = {}
        self._cache: dict[tuple, tuple[float, float]] = {}  # (statistics, digital solver work)
        self._analog: dict[tuple, float | None] = {}  # model price of an analog layer, until it reports
        self._reported: dict[str, list[float | None]] = {}

    def observe_rows(self, rows: Mapping[str, int]) -> None:
        """Rows of statistics per layer in a factor-update step (batch times positions)."""
        for name, count in rows.items():
            if count > 0:
                self._rows[name] = int(count)

    def observe_reports(self, reports: Mapping[str, Any]) -> None:
        """Solver reports of one step (``"<layer>/prepare"``, ``"<layer>/apply"``)."""
        for key, report in reports.items():
            name, _, kind = key.rpartition("/")
            seconds = getattr(report, "hardware_time_s", None)
            slot = self._reported.setdefault(name, [None, None])
            if kind == "prepare" and seconds is not None:
                slot[0] = float(seconds)
            elif kind == "apply":
                slot[1] = None if seconds is None else float(seconds)

    def layer_cost(self, name: str, solver: KFACSolver, n_a: int, n_g: int, has_bias: bool
                   ) -> tuple[float, float]:
        """``(all-digital seconds, hybrid seconds)`` per step of one layer."""
        rows = self._rows.get(name, 1)
        analog = is_analog(solver)
        settings = solver.pricing_settings()
        key = (name, rows, analog, tuple(sorted((k, str(v)) for k, v in settings.items())))
        if key not in self._cache:
            self._cache[key] = self._model_costs(settings, n_a, n_g, rows)
        statistics, digital_s = self._cache[key]
        if not analog:
            return statistics + digital_s, statistics + digital_s
        prepared, applied = self._reported.get(name, [None, None])
        if prepared is not None or applied is not None:
            analog_s = (prepared or 0.0) / self.schedule.inverse_every + (applied or 0.0)
        else:  # no report yet (or a solver that reports none): the model price of its settings
            if key not in self._analog:
                self._analog[key] = price_layer(
                    settings, settings["digital_method"], n_a, n_g, hardware=self.policy.hardware,
                    digital=self.policy.digital, kappa=self.policy.kappa, eps=self.policy.eps,
                    inverse_every=self.schedule.inverse_every, oversize="block",
                    precision=self.schedule.precision)[0]
            analog_s = self._analog[key] or 0.0
        return statistics + digital_s, statistics + analog_s

    def _model_costs(self, settings: Mapping[str, Any], n_a: int, n_g: int, rows: int
                     ) -> tuple[float, float]:
        host, prec = self.policy.digital, self.schedule.precision
        statistics = (pricing.gemm_time(n_a, rows, n_a, host, prec)
                      + pricing.gemm_time(n_g, rows, n_g, host, prec)) / self.schedule.factor_every
        digital_s = price_digital_layer(settings["digital_method"], n_a, n_g, digital=host,
                                        inverse_every=self.schedule.inverse_every, precision=prec)
        return statistics, digital_s
