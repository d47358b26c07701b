"""End states the thermo device's units hold between calls: one set per unit, time-shared by the
factors placed on it (factor G of layer i on unit 2i mod units, A on 2i+1), so a model with more
factors than units keeps at most one end state per unit; converted to the current call's units."""

from __future__ import annotations

import torch
import torch.nn as nn

import hw_models as hm
from thermo_kfac import KFACPreconditioner
from thermo_kfac.solvers.thermo_device import DeviceFactor, UnitBank, hold_end_states, reload_start


def _held(solver) -> list[tuple[int, int]]:
    """``(unit, columns)`` of the end states each factor of ``solver`` can still continue from
    (its unit by the placement rule of the module docs)."""
    bank = next(v for v in solver.shared.values() if isinstance(v, UnitBank))
    out = []
    for key, f in solver.factors.items():
        unit = (2 * solver.layer_index + (0 if key == "G" else 1)) % solver.device.units
        if f.held is not None and bank.holds(unit, f.held_seq):
            out.append((unit, f.held.shape[1]))
    return out


def test_three_layers_on_four_units_hold_four_states():
    """Six factors on the chip's four units: layers 0 and 2 share units 0 and 1, so after a step
    only the last of them to run holds its states there; every unit holds one state, and the
    first layer re-sends every warm-start value (its units were overwritten)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = KFACPreconditioner(model, optimizer=opt, solver="thermo",
                             solver_options={"analog_time": 2.0, "burn_in": 0.0, "deflate": 0})
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    units = hm.thermo_device("chip").units
    assert units == 4
    reloaded, zeroed = [], []
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
        infos = [state.solver.last_report.info for state in pre.layer_table.values()]
        reloaded.append([i["reloaded_values"] for i in infos])
        zeroed.append([i["zero_started_columns"] for i in infos])
    solvers = [state.solver for state in pre.layer_table.values()]
    assert [s.layer_index for s in solvers] == [0, 1, 2]
    assert len({id(s.shared) for s in solvers}) == 1  # one device, one set of units
    held = [h for s in solvers for h in _held(s)]
    assert sorted(u for u, _ in held) == list(range(units))  # each unit holds one set ...
    assert all(cols == 1 for _, cols in held)  # ... of one state: 4 in all, not 6 factors x 4
    assert {u for u, _ in _held(solvers[1])} == {2, 3}
    assert {u for u, _ in _held(solvers[2])} == {0, 1}
    assert not _held(solvers[0])  # overwritten by the last layer, which shares its units
    # second step, [G, A] solves of n x m (G: n_out x (n_in + 1) columns; A: transposed): the
    # first layer re-sent every value it did not start from 0, the middle one all but its held one
    shapes = [((7, 7), (7, 7)), ((5, 8), (8, 5))]
    for layer, ((nG, mG), (nA, mA)) in enumerate(shapes):
        full = [nG * (mG - zeroed[1][layer][0]), nA * (mA - zeroed[1][layer][1])]
        if layer == 0:
            assert reloaded[1][layer] == full
        else:
            assert all(r < f for r, f in zip(reloaded[1][layer], full, strict=True))


def test_a_unit_keeps_only_its_latest_writer():
    """The bank: a factor's held states are valid until another factor holds on its unit."""
    bank = UnitBank()
    f, g = (DeviceFactor(M=torch.eye(3), P=torch.eye(3), c=1.0, d=None, seed=0) for _ in range(2))
    end = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    hold_end_states(f, end, 1, bank=bank, unit=0)
    x0 = torch.full((3, 2), 7.0, dtype=torch.float64)
    resend = torch.ones(2, dtype=torch.bool)
    start, sent = reload_start(f, x0, resend, hm.NoiseConfig(), 0, bank=bank, unit=0)
    assert torch.equal(start[:, 1], end[:, 1]) and sent == 3  # its last column continues
    hold_end_states(g, end, 1, bank=bank, unit=0)  # another factor runs on the same unit
    start, sent = reload_start(f, x0, resend, hm.NoiseConfig(), 0, bank=bank, unit=0)
    assert torch.equal(start, x0) and sent == 6  # f's state is gone: everything is re-sent
    resumed = UnitBank()  # a resume rebuilds the units' latest holds from the factors' states
    for h in (g, f):
        resumed.observe(0, h.held_seq)
    assert resumed.holds(0, g.held_seq) and not resumed.holds(0, f.held_seq)
