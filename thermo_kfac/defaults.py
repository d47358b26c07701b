"""The one source of K-FAC's defaults: :class:`~thermo_kfac.KFACPreconditioner`,
:class:`~thermo_kfac.KFAC` and the command line's ``kfac`` / ``kfac-adaptive`` specs read them here.

The preconditioner's values were chosen by sweeps on digits (MLP 64-128-128-10, batch 256, 30-40
epochs, seeds 0 and 1): fastest to Adam's final loss with a test loss close to Adam's. They also
keep the README models stable at the README learning rates (SGD lr 0.3, momentum 0.9): a damping
of 0.1 bounds the preconditioner's gain on directions of tiny curvature, and KL clipping (on as
in kfac-pytorch, whenever the learning rate is known) bounds the step's predicted KL change, so the
first steps, taken before the factors have averaged over many batches, cannot blow up.

``KFAC`` (Martens & Grosse's full method) adapts its damping and chooses its own step size, so it
starts from the same damping but has no KL clip; it uses Monte-Carlo factors (the Fisher its
quadratic model assumes) and refreshes them more often, as its damping adaptation expects.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BASE_OPTIMIZER_DEFAULTS", "KFAC_ADAPTIVE_DEFAULTS", "KFAC_DEFAULTS"]

# KFACPreconditioner and the `kfac` spec.
KFAC_DEFAULTS: dict[str, Any] = {
    "damping": 0.1,
    "kl_clip": 1e-3,  # applied when an optimizer (the learning rate) is given
    "fisher_type": "empirical",
    "factor_decay": 0.95,
    "factor_update_every": 10,
    "inverse_update_every": 50,
    "pi_damping": False,
    "solver": "eigh",
}

# thermo_kfac.KFAC and the `kfac-adaptive` spec: what differs from KFAC_DEFAULTS, and why above.
KFAC_ADAPTIVE_DEFAULTS: dict[str, Any] = {
    **KFAC_DEFAULTS,
    "kl_clip": None,  # the quadratic model's step size replaces it
    "fisher_type": "mc",
    "factor_update_every": 5,
    "inverse_update_every": 20,
}

# The `kfac` spec's base optimizer (the README's `torch.optim.SGD(lr=0.3, momentum=0.9)`).
BASE_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.3, "momentum": 0.9},
    "adam": {"lr": 1e-3},
}
