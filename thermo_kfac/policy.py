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

This module holds the policy; by job, the rest lives beside it and is re-exported here:
specs (:mod:`thermo_kfac.solver_spec`), the assignment table (:mod:`thermo_kfac.assignment`),
the machines' predicted times (:class:`~thermo_kfac.hardware_pricer.HardwarePricer`) and the
``auto`` solver (:mod:`thermo_kfac.solvers.auto`); a solver map as text is read by
:func:`thermo_kfac.grammar.parse_solver_map` (:meth:`SolverPolicy.coerce`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hw_models import pricing
from hw_models.cost import KFACSchedule
from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_EPS, DEFAULT_KAPPA, DEFAULT_THERMO
from hw_models.devices import DigitalDevice, ThermoDevice, digital_device, thermo_device
from hw_models.units import format_seconds
from hw_models.validation import check_number, check_positive
from thermo_kfac.assignment import LayerAssignment, format_assignment
from thermo_kfac.grammar import parse_solver_map
from thermo_kfac.hardware_pricer import HardwarePricer
from thermo_kfac.layer_pricing import price_layer
from thermo_kfac.solver_spec import RULES, SolverSpec, is_analog
from thermo_kfac.solvers.auto import AutoSolver

__all__ = ["RULES", "AutoSolver", "HardwarePricer", "LayerAssignment", "SolverPolicy", "SolverSpec",
           "format_assignment", "is_analog"]


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
