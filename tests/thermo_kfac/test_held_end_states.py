"""End states the thermo device's units hold between calls: one set per unit, time-shared by the
factors placed on it (factor G of layer i on unit 2i mod units, A on 2i+1): the layers apply in
turn every step, so only a factor alone on its unit continues from its own end state."""

from __future__ import annotations

import torch
import torch.nn as nn

import hw_models as hm
from thermo_kfac import KFACPreconditioner
from thermo_kfac.solvers.thermo_device import shares_unit


def test_placement_decides_which_factors_keep_their_unit():
    """Three analog layers on four units: layers 0 and 2 share units 0 and 1, layer 1 has units 2
    and 3 to itself; a fixed unit or a one-unit device shares it among all factors."""
    layers = [0, 1, 2]
    shared = {(i, k): shares_unit(i, k, layers, 4) for i in layers for k in "GA"}
    assert shared == {(0, "G"): True, (0, "A"): True, (1, "G"): False, (1, "A"): False,
                      (2, "G"): True, (2, "A"): True}
    assert not shares_unit(0, "G", [0], 4) and not shares_unit(0, "A", [0, 1], 4)
    assert shares_unit(0, "G", [0], 1)  # one unit: G and A of the same layer take turns
    assert shares_unit(1, "A", [1, 5], 8, fixed_unit=3)
    assert not shares_unit(1, "A", [1, 2], 8)  # units 3 vs 4 and 5


def test_three_layers_on_four_units_reload_what_their_units_lost():
    """The 3-layer model on the chip's four units: the middle layer continues one column per
    factor from its unit; the outer layers, whose units the other one used in between, re-send
    every warm-start value (they hold no state of their own when they come back)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = KFACPreconditioner(model, optimizer=opt, solver="thermo",
                             solver_options={"analog_time": 2.0, "burn_in": 0.0, "deflate": 0})
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    assert hm.thermo_device("chip").units == 4
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    solvers = [state.solver for state in pre.layer_table.values()]
    assert [s.layer_index for s in solvers] == [0, 1, 2]
    assert len({id(s.shared) for s in solvers}) == 1 and solvers[0].shared["analog_layers"] == [0, 1, 2]
    # [G, A] solves of n x m (G: n_out x (n_in + 1) columns; A: transposed), second step
    shapes = [((7, 7), (7, 7)), ((5, 8), (8, 5)), ((3, 6), (6, 3))]
    for solver, ((nG, mG), (nA, mA)) in zip(solvers, shapes, strict=True):
        info = solver.last_report.info
        zeroed = info["zero_started_columns"]
        full = [nG * (mG - zeroed[0]), nA * (mA - zeroed[1])]
        if solver.layer_index == 1:  # alone on its units: one column per factor continues
            assert all(r < f for r, f in zip(info["reloaded_values"], full, strict=True))
        else:
            assert info["reloaded_values"] == full
