"""K-FAC preconditioner that works with any ``torch.optim`` optimizer::

    precond = KFACPreconditioner(model, loss="cross_entropy", optimizer=opt)
    for x, y in loader:
        opt.zero_grad()
        out = model(x)
        precond.accumulate_curvature(out)   # only needed for fisher_type "mc" / "type2"
        loss_fn(out, y).backward()
        precond.step()                      # rewrites .grad of the registered layers
        opt.step()

Each registered layer keeps exponential moving averages of its Kronecker factors ``A`` (inputs,
bias column last) and ``G`` (output gradients), so that the curvature block of the row-major
flattened ``[W | b]`` is ``kron(G, A)``. Every ``inverse_update_every`` steps its solver is
prepared from the damped factors; every step the gradient matrix ``V`` is replaced by
``(G + lam_G I)^-1 V (A + lam_A I)^-1`` (optionally KL-clipped). The per-layer state is the
public :class:`thermo_kfac.layers.LayerTable` (``precond.layer_table``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hw_models.cost import KFACSchedule
from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.capture import (
    AttentionCapture,
    LayerAdapter,
    LinearMapAdapter,
    candidate_modules,
    capture_hooks,
    check_attention,
    compile_skip,
    flavour_for,
    flavour_rules,
    make_adapter,
    module_linear_maps,
    remove_handles,
    tap_hooks,
)
from thermo_kfac.defaults import KFAC_DEFAULTS
from thermo_kfac.fisher import (
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    LOSSES,
    REDUCTIONS,
    FisherWeights,
    kl_clip_scale,
)
from thermo_kfac.layers import (
    DistributionStrategy,
    LayerState,
    LayerTable,
    PreconditionedGradient,
    attach_strategy,
)
from thermo_kfac.policy import HardwarePricer, LayerAssignment, SolverPolicy, SolverSpec, is_analog
from thermo_kfac.process_group import check_resume, unwrap
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverFailure, solver_factory
from thermo_kfac.solvers.kronecker_svd import CURVATURES, curvature_solver_factory

FACTOR_DTYPES = (torch.float32, torch.float64)


class KFACPreconditioner:
    """Kronecker-factored preconditioner for the ``nn.Linear`` and ``nn.Conv2d`` layers of a model.

    Args:
        model: the network. Every ``nn.Linear`` and ``nn.Conv2d`` (groups=1) whose weight requires
            grad is registered unless matched by ``skip``; other parameters are left untouched.
        loss: the loss the model is trained with: ``"cross_entropy"`` (logits, class dim 1),
            ``"mse"`` or ``"bce"`` (binary cross-entropy with logits).
        reduction: ``"mean"`` (as in ``torch.nn.functional``, over all loss elements) or ``"sum"``.
            Factors are scaled so that ``kron(G, A)`` approximates the curvature of exactly
            that loss.
        fisher_type: ``"empirical"`` (gradients of the data labels, from the user's backward),
            ``"mc"`` (labels sampled from the model; needs :meth:`accumulate_curvature`) or
            ``"type2"`` (exact GGN factors by backpropagating the columns of the loss Hessian's
            square root; needs :meth:`accumulate_curvature`; one backward per output feature).
        damping: Tikhonov damping ``lambda`` of each Kronecker block (>= 0).
        pi_damping: split the damping between the factors by the pi rule of Martens & Grosse.
        factor_decay: EMA decay of the factors in [0, 1); 0 keeps only the current batch.
        factor_update_every: update the factors every this many steps.
        inverse_update_every: re-prepare the solvers every this many steps.
        solver: ``"eigh"``, ``"cholesky"`` (or any registered name, see
            :func:`thermo_kfac.available_solvers`), a ``KFACSolver`` subclass or a prototype
            instance (copied per layer), or a per-layer rule of :mod:`thermo_kfac.policy`:
            ``"auto"`` (cheapest predicted time per layer) or ``"fits"`` (analog if the factors
            fit the device); a rule's ``solver_options`` configure its analog solver.
        solver_options: keyword arguments for the solver class.
        solver_map: per-layer solvers: ``{pattern: spec}`` (first match wins; a pattern is searched
            in the layer name or matches its type name; specs like ``"thermo:bits=8"``, ``"auto"``)
            or a :class:`thermo_kfac.policy.SolverPolicy` (which also picks the hardware presets
            used for ``auto`` and for ``last_report``'s predicted times). Unmatched layers use
            ``solver``. :meth:`assignment` tells which solver each layer got.
        kl_clip: scale the step so that the predicted KL change ``lr^2 <U, grad>`` stays below
            this value (None disables). The learning rates are read from ``optimizer``.
            ``"default"``: 1e-3 when ``optimizer`` is given, off without one.
        optimizer: the optimizer whose param groups give the learning rates for KL clipping.
        factor_dtype: ``torch.float32`` or ``torch.float64``; factors are accumulated and
            factorized in this dtype whatever the model or autocast dtype.
        skip: regular expressions; a layer whose qualified name or class name matches one of
            them (``re.search``) is not registered.
        kfac_approx: K-FAC flavour for layers applied at R shared positions (Linear on
            ``(N, R, d)`` inputs, Conv2d, attention, Embedding, GCN layers): ``"expand"`` (every
            position is a row; exact for a loss summed over positions) or ``"reduce"`` (the inputs
            averaged and the output gradients summed over positions, one row per example; exact
            for a loss on a per-example aggregate, and about R times cheaper). See
            ``docs/kfac_variants.md``.
        approx_per_layer: ``{regex: flavour}`` overriding ``kfac_approx`` for the layers whose
            qualified name matches (``re.search``, first match wins).
        linear_maps: ``{name: weight}`` or ``{name: (weight, bias)}``: extra parameters used as
            linear maps through :func:`thermo_kfac.capture.linear_map` in the model's forward
            (see :meth:`register_linear_map`); ``kfac_linear_maps()`` of modules (KronLinear) are added.
        mc_samples: labels drawn per example for ``fisher_type="mc"``.
        seed: seed of the preconditioner's own generator (MC labels).
        fallback_solver: digital solver (name, class or instance) used for a layer's step when
            its solver returns a non-finite result or fails the residual check; None disables.
            Fallbacks are counted per layer (:meth:`fallbacks`) and warned once per layer.
        fallback_residual_tol: if set, a result ``X`` whose relative residual
            ``||(G + lam_G I) X (A + lam_A I) - V|| / ||V||`` on the factored damped system exceeds
            this value also falls back (costs two extra products per layer and step; meant for
            approximate solvers such as the simulated analog one).
        distributed: a strategy built outside (``thermo_kfac.distributed.DistributedKFAC(config)``),
            attached once the layers are registered; ``None``: this process alone (refused in a
            multi-rank process group); ``False``: each rank alone. DDP models are accepted as is.
        curvature: ``"kfac"`` (``kron(G, A)``), or a Kronecker-SVD approximation of each Fisher
            block (:mod:`thermo_kfac.solvers.kronecker_svd`): ``"kpsvd"`` (best single Kronecker
            product), ``"deflation"`` (best two) or ``"kfac_corrected"`` (K-FAC plus the best
            Kronecker product of its residual). These use their own solver (leave ``solver``
            at ``"eigh"``; ``solver_options`` configure it) and average their terms with
            ``factor_decay`` every ``factor_update_every`` steps.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: str = "cross_entropy",
        reduction: str = "mean",
        fisher_type: str = KFAC_DEFAULTS["fisher_type"],
        damping: float = KFAC_DEFAULTS["damping"],
        pi_damping: bool = KFAC_DEFAULTS["pi_damping"],
        factor_decay: float = KFAC_DEFAULTS["factor_decay"],
        factor_update_every: int = KFAC_DEFAULTS["factor_update_every"],
        inverse_update_every: int = KFAC_DEFAULTS["inverse_update_every"],
        solver: str | KFACSolver | type[KFACSolver] = KFAC_DEFAULTS["solver"],
        solver_options: dict[str, Any] | None = None,
        kl_clip: float | str | None = "default",
        optimizer: torch.optim.Optimizer | None = None,
        factor_dtype: torch.dtype = torch.float32,
        skip: str | Sequence[str] = (),
        mc_samples: int = 1,
        seed: int = 0,
        fallback_solver: str | KFACSolver | type[KFACSolver] | None = "eigh",
        fallback_residual_tol: float | None = None,
        distributed: DistributionStrategy | bool | None = None,
        curvature: str = "kfac",
        solver_map: Any = None,
        kfac_approx: str = "expand",
        approx_per_layer: dict[str, str] | None = None,
        linear_maps: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.loss = check_choice("loss", loss, LOSSES)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.fisher_type = check_choice("fisher_type", fisher_type, FISHER_TYPES)
        self.damping = Damping(check_positive("damping", damping, allow_zero=True), bool(pi_damping))
        self.factor_decay = check_number("factor_decay", factor_decay, low=0.0, high=1.0,
                                         high_inclusive=False)
        self.factor_update_every = check_positive("factor_update_every", factor_update_every, integer=True)
        self.inverse_update_every = check_positive("inverse_update_every", inverse_update_every, integer=True)
        if isinstance(kl_clip, str) and kl_clip == "default":  # on only where the lr is known
            kl_clip = KFAC_DEFAULTS["kl_clip"] if optimizer is not None else None
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
            if optimizer is None:
                raise ValueError("kl_clip needs the learning rate: pass optimizer=<your torch.optim "
                                 "optimizer> (its param groups' lr are used), or set kl_clip=None")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.kl_clip = kl_clip
        self.optimizer = optimizer
        self.factor_dtype = check_choice("factor_dtype", factor_dtype, FACTOR_DTYPES)
        self.mc_samples = check_positive("mc_samples", mc_samples, integer=True)
        self.seed = check_number("seed", seed, integer=True)
        self.solver_spec = solver
        # the update periods and precision, as the cost model takes them
        self._schedule = KFACSchedule(factor_every=self.factor_update_every,
                                      inverse_every=self.inverse_update_every,
                                      precision="fp64" if self.factor_dtype == torch.float64 else "fp32")
        self.curvature = check_choice("curvature", curvature, CURVATURES)
        # Kronecker-SVD curvatures bring their own solver for every layer; the policy only prices them
        self._curvature_factory = None
        if self.curvature != "kfac":
            if solver_map is not None:
                raise ValueError(f"solver_map cannot be combined with curvature={self.curvature!r}: "
                                 "the Kronecker-SVD curvatures use their own solver on every layer")
            self._curvature_factory = curvature_solver_factory(
                self.curvature, solver, solver_options, decay=self.factor_decay,
                update_every=self.factor_update_every)
            solver, solver_options = "eigh", None
        self.policy = SolverPolicy.coerce(solver_map)
        self._default_spec = SolverSpec.parse(solver, solver_options)
        self.policy.validate(self._default_spec)  # bad options fail before layers are registered
        self._assignments: dict[str, LayerAssignment] = {}
        self._factories: dict[str, Any] = {}
        self._layer_factories: dict[str, Any] = {}
        self._make_fallback = None if fallback_solver is None else solver_factory(fallback_solver)
        if fallback_residual_tol is not None:
            check_positive("fallback_residual_tol", fallback_residual_tol)
            if fallback_solver is None:
                raise ValueError("fallback_residual_tol needs a fallback_solver (e.g. 'eigh')")
        self.fallback_residual_tol = fallback_residual_tol
        self._skip = compile_skip(skip)

        self.kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        self._approx_rules = flavour_rules(approx_per_layer)
        self._attention: list[AttentionCapture] = []

        self.model = model
        self.steps = 0
        self._generator: torch.Generator | None = None
        self._fisher = FisherWeights(self.loss, self.reduction, self.fisher_type, self.mc_samples)
        self.last_report: dict[str, Any] = {}
        self._layers = LayerTable()
        self._register(unwrap(model))  # DDP: layer names without the "module." prefix
        for key, spec in {**module_linear_maps(unwrap(model), self._skip), **(linear_maps or {})}.items():
            self.register_linear_map(key, *(spec if isinstance(spec, tuple) else (spec, None)))
        if not self._layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to precondition "
                             "(after applying skip)")
        self._hooks = attach_strategy(distributed, self)

    # ------------------------------------------------------------------ registration and hooks
    def _register(self, model: nn.Module) -> None:
        modules = list(candidate_modules(model, self._skip, patched_attention=True))
        for name, module in modules:
            if isinstance(module, nn.MultiheadAttention):
                check_attention(name, module)  # before any hook or patch is installed
        owners: dict[int, str] = {}  # id(weight) -> registered layer using it (weight tying)
        for name, module in modules:
            if isinstance(module, nn.MultiheadAttention):
                # Registered modules: the explicit forward routes in_proj through linear_map and
                # out_proj through its module call (registered below as a Linear).
                self._attention.append(AttentionCapture(module))
                if module.in_proj_weight.requires_grad:
                    prefix = f"{name}." if name else ""
                    self.register_linear_map(f"{prefix}in_proj", module.in_proj_weight,
                                             module.in_proj_bias, module=module)
                    owners[id(module.in_proj_weight)] = f"{prefix}in_proj"
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
                continue
            adapter = make_adapter(name, module, flavour_for(self._approx_rules, name, self.kfac_approx),
                                   extra=True)
            if adapter is None:
                continue
            tied = owners.get(id(weight))
            if tied is not None:
                state = self._layers.tied_state(tied, name, adapter)  # shares the first layer's factors
            else:
                state = self._new_state(name, module, adapter)
                owners[id(weight)] = name
            pre_hook, forward_hook = self._capture_hooks(state)
            state.handles.append(module.register_forward_pre_hook(pre_hook))
            state.handles.append(module.register_forward_hook(forward_hook))
        self._root_handle = model.register_forward_hook(self._fisher.record_output)
        self._pricer = HardwarePricer(self.policy, self._schedule)

    def _new_state(self, name: str, module: Any, adapter: LayerAdapter) -> LayerState:
        state = LayerState(adapter=adapter, solver=self._assign(name, module, adapter))
        state.solver.layer_index = len(self._layers)
        self._layers.add(name, state)
        return state

    def _assign(self, name: str, module: nn.Module, adapter: LayerAdapter) -> KFACSolver:
        """The layer's solver, chosen by the solver policy (one factory per distinct spec)."""
        assignment = self.policy.assign(name, type(module).__name__, adapter.d_in, adapter.d_out,
                                        has_bias=adapter.has_bias, default=self._default_spec,
                                        schedule=self._schedule)
        self._assignments[name] = assignment
        spec = assignment.spec
        key = spec.text if spec.solver is None else f"object:{id(spec.solver)}"
        if key not in self._factories:
            self._factories[key] = assignment.spec.factory()
        self._layer_factories[name] = self._curvature_factory or self._factories[key]
        return self._layer_factories[name]()

    def register_linear_map(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            *, module: nn.Module | None = None, approx: str | None = None) -> None:
        """Register a parameter used as a linear map ``(N, R, d_in) -> (N, R, d_out)``.

        The model's forward must compute that map with
        ``thermo_kfac.capture.linear_map(x, weight, bias)`` (``F.linear`` that K-FAC can see);
        ``weight`` is ``(d_out, d_in)``. Capture happens when gradients are enabled and, if
        ``module`` is given, while it is in training mode. Call before the first :meth:`step`.
        ``approx`` overrides the flavour (default from ``kfac_approx`` / ``approx_per_layer``).
        """
        if name in self._layers:
            raise ValueError(f"a layer named {name!r} is already registered; choose another name")
        if self.steps:
            raise ValueError("register_linear_map must be called before the first step()")
        other = self._layers.owner_of(weight)
        if other is not None:
            raise ValueError(f"K-FAC: parameter of linear map {name!r} is already registered "
                             f"as (part of) layer {other!r}; register it once, or add skip=[{other!r}]")
        flavour = flavour_for(self._approx_rules, name, self.kfac_approx) if approx is None else approx
        adapter = LinearMapAdapter(name, weight, bias, module=module, approx=flavour)
        state = self._new_state(name, adapter.module, adapter)
        # adapter.module is a LinearMap: its owner's training flag gates the capture
        state.handles.append(tap_hooks(weight, adapter.module, *self._capture_hooks(state)))

    def _capture_step(self) -> bool:
        return self.steps % self.factor_update_every == 0

    def _capture_hooks(self, state: LayerState):
        """The shared capture hooks (:mod:`thermo_kfac.capture.hooks`) feeding ``state``."""
        def on_input(a: torch.Tensor) -> None:
            state.add_inputs(a, self.factor_dtype, self._capture_step())

        def on_output_grad(_: torch.Tensor, g: torch.Tensor) -> None:
            weight = self._fisher.weight()  # None: a backward that this Fisher type ignores
            if weight is not None:
                state.add_output_grads(g, weight, self.factor_dtype, self._capture_step())

        def active() -> bool:
            return self._capture_step() or state.solver.uses_batch_statistics

        return capture_hooks(active, on_input, on_output_grad)

    # ------------------------------------------------------------------------------ public API
    @property
    def layers(self) -> list[str]:
        """Qualified names of the registered layers."""
        return list(self._layers)

    @property
    def layer_table(self) -> LayerTable:
        """The per-layer state; what others may use of it: :mod:`thermo_kfac.layers`."""
        return self._layers

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer name: (A, G)}`` of the layers whose factors have been computed."""
        return self._layers.factors()

    def assignment(self) -> dict[str, str]:
        """``{layer name: solver name}`` as chosen by the solver policy."""
        return {name: a.solver for name, a in self._assignments.items()}

    def assignment_details(self) -> list[LayerAssignment]:
        """Per layer: type, factor sizes, solver spec and the rule that chose it."""
        return list(self._assignments.values())

    def fallbacks(self) -> dict[str, int]:
        """Steps per layer whose preconditioned gradient came from the fallback solver."""
        return self._layers.fallbacks()

    def skipped_updates(self) -> dict[str, int]:
        """Number of factor updates skipped per layer because of NaN/Inf statistics."""
        return self._layers.skipped_updates()

    def new_solver(self, name: str | None = None) -> KFACSolver:
        """A fresh, unprepared solver for layer ``name`` as assigned (None: the default solver)."""
        if name is not None:
            return self._layer_factories[name]()
        return (self._curvature_factory or self._default_spec.factory())()

    def rng_state(self) -> torch.Tensor | None:
        """State of the generator that draws Monte-Carlo labels (None before its first use)."""
        return None if self._generator is None else self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state` (the generator is created on the layers' device if needed)."""
        self._get_generator(self._layers.device).set_state(state)

    def accumulate_curvature(self, outputs: torch.Tensor) -> None:
        """Compute the curvature statistics from ``outputs`` (the tensor the loss is computed from).

        Call after the forward pass and before ``loss.backward()``. For ``fisher_type="mc"`` it
        backpropagates ``mc_samples`` losses of labels sampled from the model, for ``"type2"``
        the columns of the loss Hessian's square root; the graph is kept and ``.grad`` is not
        touched. For ``"empirical"`` it only records the output shape used for scaling. On steps
        that update no factors it returns at once.
        """
        if not isinstance(outputs, torch.Tensor):
            raise ValueError(f"outputs must be a tensor, got {type(outputs).__name__}")
        if not (self._capture_step() or self._layers.uses_batch_statistics):
            return
        self._fisher.output_shape = outputs.shape
        if self.fisher_type == "empirical":
            return
        if not outputs.requires_grad:
            raise ValueError("outputs does not require grad; call accumulate_curvature on the "
                             "model's output in a forward pass with gradients enabled")
        if not bool(torch.isfinite(outputs).all()):
            # Sampling labels from NaN logits is impossible; leave this step's G statistics empty,
            # so _update_factors skips (and counts) the update for every layer.
            warnings.warn("K-FAC: non-finite model outputs; curvature update skipped, training "
                          "continues (see skipped_updates())", RuntimeWarning, stacklevel=2)
            self._layers.skip_curvature_update()
            return
        params = [p for s in self._layers.values() for p in s.adapter.parameters()]
        mc = self.fisher_type == "mc"
        self._fisher.backpropagate(outputs, params, self._get_generator(outputs.device) if mc else None)

    def step(self) -> None:
        """Update factors/solvers when due and precondition the registered layers' gradients."""
        start = time.perf_counter()
        factor_update = self._capture_step()
        inverse_update = self.steps % self.inverse_update_every == 0
        self._hooks.begin_step(self)
        if factor_update:
            self._pricer.observe_rows({name: s.a_rows for name, s in self._layers.items()})
            self._update_factors()
            self._hooks.factors_updated(self, inverse_update)
            if self.steps == 0:
                self._layers.check_fired(
                    "call precond.accumulate_curvature(outputs) before loss.backward()"
                    if self.fisher_type != "empirical" else "call loss.backward() before step()")
        reports: dict[str, Any] = {}
        if inverse_update:
            self._hooks.before_inverse_update(self)
            for name, state in self._layers.items():
                if self._hooks.owns(name) and state.has_factors:  # owns: not another rank's
                    self._prepare_solver(name, state)
                    if state.solver.last_report is not None:
                        reports[f"{name}/prepare"] = state.solver.last_report
            self._hooks.after_inverse_update(self)
        preconditioned = self._hooks.precondition(self, reports)
        kl_scale = self._apply(preconditioned)
        self.steps += 1
        times = [r.hardware_time_s for r in reports.values() if r.hardware_time_s is not None]
        energies = [r.energy_j for r in reports.values() if r.energy_j is not None]
        digital_s, hybrid_s = self._predicted_times(reports)
        self.last_report = {
            "step": self.steps, "factor_update": factor_update, "inverse_update": inverse_update,
            "kl_scale": kl_scale, "hardware_time_s": sum(times) if times else None,
            "fallbacks": sum(self.fallbacks().values()), "energy_j": sum(energies) if energies else None,
            "solver_reports": reports, "predicted_digital_s": digital_s,
            "predicted_hybrid_s": hybrid_s, "wall_time_s": time.perf_counter() - start,
        }
        extra = self._hooks.report()
        if extra is not None:
            self.last_report["distributed"] = extra

    def _predicted_times(self, reports: dict[str, Any]) -> tuple[float, float]:
        """Predicted curvature seconds per step, all-digital and hybrid (see HardwarePricer)."""
        self._pricer.observe_reports(reports)
        digital = hybrid = 0.0
        for name, s in self._layers.items():
            d, h = self._pricer.layer_cost(name, s.solver, s.adapter.d_in, s.adapter.d_out,
                                           s.adapter.has_bias)
            digital += d
            # a step served by the fallback also pays the digital solver's work on the hybrid machine
            fell_back = s.last_fallback_step == self.steps - 1 and is_analog(s.solver)
            hybrid += h + (d if fell_back else 0.0)
        return digital, hybrid

    # ---------------------------------------------------------------------------- internals
    def _get_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            # ranks see different examples, so each draws its own labels
            self._generator.manual_seed(self.seed + self._hooks.rank)
        return self._generator

    def _update_factors(self) -> None:
        for name, state in self._layers.items():
            if not state.update_factors(self.factor_decay):
                # No running count in the message, so Python's filter shows it once per layer;
                # skipped_updates() has the counts.
                warnings.warn(f"K-FAC: non-finite curvature statistics in layer {name!r}; factor "
                              "update skipped, training continues (see skipped_updates())",
                              RuntimeWarning, stacklevel=3)

    def _prepare_solver(self, name: str, state: LayerState) -> None:
        err = state.prepare(self.damping, can_fall_back=self._make_fallback is not None)
        if err is not None and not state.prepare_warned:
            state.prepare_warned = True
            then = ("using the fallback solver until the next inverse update (counted in "
                    "fallbacks(); warned once per layer)" if state.prepare_failed
                    else "keeping the previous preconditioner")
            warnings.warn(f"K-FAC: solver {type(state.solver).__name__} failed on layer {name!r} "
                          f"({err}); {then}", RuntimeWarning, stacklevel=3)

    def precondition_layers(self, reports: dict[str, Any], names: set[str] | None = None
                            ) -> list[PreconditionedGradient]:
        """Precondition the gradients of the ready layers (only those in ``names`` if given),
        in layer order, without writing ``.grad``: ``[(layer state, raw gradient matrix,
        preconditioned matrix)]``. Solver reports are added to ``reports``; the fallback solver
        serves unusable results as in :meth:`step`."""
        out = []
        for name, state in self._layers.items():
            if names is not None and name not in names:
                continue
            if state.solver.uses_batch_statistics:
                state.observe_batch()
            grad = state.adapter.grad_matrix()
            if grad is None or not (state.prepare_failed or state.solver.ready):
                continue
            rhs = grad.to(self.factor_dtype)
            result = self._serve(name, state, rhs, reports)
            out.append(PreconditionedGradient(state, grad, result.to(grad.dtype)))
        return out

    def _serve(self, name: str, state: LayerState, rhs: torch.Tensor, reports: dict) -> torch.Tensor:
        """The layer's result; the fallback serves a failed prepare, a ``SolverFailure`` from apply
        (the one failure channel) and, as a guard, non-finite or too inaccurate results."""
        if state.prepare_failed:
            return self._fall_back(name, state, rhs, warn=False)
        try:
            result = state.solver.apply(rhs)
        except SolverFailure as err:
            if self._make_fallback is None:
                raise
            return self._fall_back(name, state, rhs, reason=str(err))
        if state.solver.last_report is not None:
            reports[f"{name}/apply"] = state.solver.last_report
        tol = self.fallback_residual_tol
        bad = not bool(torch.isfinite(result.sum())) or (tol is not None and state.has_factors and (
            state.relative_residual(rhs, result, self.damping) > tol))
        if bad and self._make_fallback is not None:
            return self._fall_back(name, state, rhs)
        return result

    def _fall_back(self, name: str, state: LayerState, rhs: torch.Tensor, **kw: Any) -> torch.Tensor:
        return state.fall_back(name, rhs, self._make_fallback, self.damping, self.steps, **kw)

    def _apply(self, preconditioned: list[PreconditionedGradient]) -> float:
        scale = 1.0
        if self.kl_clip is not None and preconditioned:
            assert self.optimizer is not None
            lrs = {p: float(group["lr"]) for group in self.optimizer.param_groups
                   for p in group["params"]}
            scale = kl_clip_scale([(update, grad, lrs.get(state.adapter.weight, 0.0))
                                   for state, grad, update in preconditioned], self.kl_clip)
        for state, _, update in preconditioned:
            state.adapter.set_grad(update if scale == 1.0 else update * scale)
        return scale

    def state_dict(self) -> dict[str, Any]:
        """Factors, solver states, counters and RNG state (everything needed to resume exactly).

        Distributed: a collective (call it on every rank); every rank gets the full state.
        """
        self._hooks.prepare_state_dict(self)
        state = {
            "steps": self.steps,
            "assignment": self.assignment(),
            "layers": {name: s.state_dict() for name, s in self._layers.items()},
            "generator": self.rng_state(),
            "output_shape": None if self._fisher.output_shape is None else tuple(self._fisher.output_shape),
        }
        self._hooks.finish_state_dict(self, state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the layers must match the registered ones."""
        check_resume(state, self._hooks.world_size)
        self._layers.check_names(state["layers"])
        saved_assignment = state.get("assignment") or {}
        differ = {n: (solver, self._assignments[n].solver) for n, solver in saved_assignment.items()
                  if n in self._assignments and self._assignments[n].solver != solver}
        if differ:
            detail = ", ".join(f"{n!r}: saved {a!r}, now {b!r}" for n, (a, b) in differ.items())
            raise ValueError(f"state_dict was saved with other per-layer solvers ({detail}); build the "
                             "preconditioner with the same solver/solver_map to resume")
        self.steps = int(state["steps"])
        for name, layer_state in state["layers"].items():
            self._layers[name].load_state_dict(layer_state, self._make_fallback)
        if state.get("generator") is not None:
            self.set_rng_state(state["generator"])
        shape = state.get("output_shape")
        self._fisher.output_shape = None if shape is None else torch.Size(shape)
        self._hooks.after_load(self, state)

    def remove_hooks(self) -> None:
        """Detach all hooks from the model (the preconditioner is unusable afterwards)."""
        for s in self._layers.values():
            remove_handles(s.handles)
        for capture in self._attention:
            capture.remove()
        self._attention.clear()
        self._root_handle.remove()

    def __repr__(self) -> str:
        return (f"KFACPreconditioner(layers={len(self._layers)}, loss={self.loss!r}, "
                f"fisher_type={self.fisher_type!r}, damping={self.damping.value}, "
                f"solver={self.solver_spec!r}, factor_update_every={self.factor_update_every}, "
                f"inverse_update_every={self.inverse_update_every})")

