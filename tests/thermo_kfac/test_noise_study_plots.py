"""Noise-study plots, checked on the matplotlib objects: labels with units, scales, legend entries,
one colour per method across files, diverged runs marked (not plotted), annotations apart."""

from __future__ import annotations

import itertools

import matplotlib
import pytest

from thermo_kfac.experiments.noise_study import summarize
from thermo_kfac.experiments.noise_study.plots import DIVERGED_COLOR, REFERENCE_COLORS, study_figures

KAPPA0, TIMES = [1e-3, 1e-2, 1e-1], [1, 50]


def _row(method, point, seed, loss, *, diverged=False, fallbacks=0, cosine=0.9):
    label = method if method != "thermo" else "thermo " + ",".join(f"{k}={v}" for k, v in point.items())
    steps = 30 if diverged else 100
    curve = [[0, 2.3, 2.3]] + [[s, loss * (1 + 100 / (s + 1)), loss * 1.5] for s in range(10, steps + 1, 10)]
    if diverged:
        curve[-1] = [steps, 1e21, 1e21]
    return {"method": method, "label": label, "point": point, "seed": seed, "steps": steps,
            "final_train_loss": 1e21 if diverged else loss,
            "final_test_loss": 1e21 if diverged else 1.5 * loss,
            "diverged": diverged, "error": None, "fallbacks": fallbacks,
            "cosine_to_exact": None if (method != "thermo" or fallbacks) else cosine, "curve": curve,
            "key": f"{label}|{seed}"}


@pytest.fixture(scope="module")
def study():
    rows = []
    for seed in (0, 1):
        rows += [_row("adam", {}, seed, 0.07), _row("kfac", {}, seed, 8e-5)]
        for k, t in itertools.product(KAPPA0, TIMES):
            point = {"kappa0": k, "analog_time": t}
            if k == 0.1 and t == 50:  # claim (c)'s diverging point
                rows.append(_row("thermo", point, seed, 0.5, diverged=True))
            else:
                # every 1-tau point falls back: one "fallbacks" annotation per point of that line
                rows.append(_row("thermo", point, seed, 1e-4 * (1 + k), fallbacks=300 if t == 1 else 0,
                                 cosine=0.97 - k))
    grid = {"kappa0": KAPPA0, "analog_time": TIMES}
    config = {"model": "mlp", "dataset": "digits", "steps": 100, "batch_size": 256, "loss": "cross_entropy",
              "optimizer": "kfac:solver=thermo", "model_options": {}, "sweep_keys": list(grid)}
    study = {"config": config, "grid": {"sweeps": grid, "seeds": [0, 1]}, "rows": rows}
    study["summary"] = summarize(rows, list(grid))
    figures = study_figures(study)
    for fig in figures.values():
        fig.canvas.draw()  # lays out the texts, so that their extents are final
    return figures


def _colors_of(ax, label):
    return [line.get_color() for line in ax.get_lines() if line.get_label().startswith(label)]


def test_every_plot_type_is_made(study):
    assert set(study) == {"loss_vs_kappa0.png", "heatmap.png", "curves.png"}


def test_loss_plot_labels_scales_and_diverged_marks(study):
    fig = study["loss_vs_kappa0.png"]
    train, test, cosine = fig.axes[:3]
    for ax in (train, test, cosine):
        assert ax.get_xlabel().startswith("thermal noise kappa0") and ax.get_ylabel()
        assert ax.get_xscale() == "log"  # kappa0 spans 100x
    assert train.get_ylabel() == "cross-entropy [nats]" and "cosine" in cosine.get_ylabel()
    assert train.get_yscale() == "log" and test.get_yscale() == "log"
    assert train.get_ylim()[1] < 1.0  # the diverged 1e21 is not plotted: healthy values stay readable
    legend = [t.get_text() for t in train.get_legend().get_texts()]
    assert {"adam (reference)", "kfac (reference)", "analog_time=1", "analog_time=50"} <= set(legend)
    assert any(text.startswith("diverged runs") for text in legend)
    marks = [line for line in train.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and matplotlib.colors.same_color(marks[0].get_color(), DIVERGED_COLOR)
    assert "2/2" in " ".join(t.get_text() for t in train.texts)


def test_annotations_do_not_overlap(study):
    fig = study["loss_vs_kappa0.png"]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b)
    assert sum("fallbacks" in t.get_text() for t in fig.axes[0].texts) == 3  # the 1-tau points


def test_one_colour_per_method_across_files(study):
    loss_ax, curves_ax = study["loss_vs_kappa0.png"].axes[0], study["curves.png"].axes[0]
    for method in ("adam", "kfac"):
        in_loss = _colors_of(loss_ax, f"{method} (reference)")
        in_curves = _colors_of(curves_ax, method)
        assert in_loss and in_curves
        for color in in_loss + in_curves:
            assert matplotlib.colors.same_color(color, REFERENCE_COLORS[method])
    assert not matplotlib.colors.same_color(REFERENCE_COLORS["adam"], REFERENCE_COLORS["kfac"])


def test_heatmap_marks_the_diverged_cell_and_scales_to_the_healthy_ones(study):
    fig = study["heatmap.png"]
    ax, bar = fig.axes[0], fig.axes[1]
    assert ax.get_xlabel().startswith("thermal noise kappa0") and ax.get_ylabel() == "analog time t [tau]"
    assert "log10 final training loss" in bar.get_ylabel()
    low, high = ax.get_images()[0].get_clim()
    assert -5 < low < high < -3  # 1e-4 .. 1.1e-4, not the diverged 1e21
    texts = {t.get_text() for t in ax.texts}
    assert "diverged\n2/2" in texts
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["every run diverged"]


def test_curves_label_axes_and_mark_where_runs_diverged(study):
    fig = study["curves.png"]
    train, test = fig.axes
    for ax in (train, test):
        assert ax.get_xlabel() == "training step" and "cross-entropy" in ax.get_ylabel()
        assert ax.get_yscale() == "log"
        assert ax.get_ylim()[1] < 100  # diverged curves are marked, not drawn to 1e21
        stops = [line for line in ax.get_lines() if line.get_marker() == "x"]
        assert sorted(float(line.get_xdata()[0]) for line in stops) == [30.0, 30.0]
    legend = [t.get_text() for t in train.get_legend().get_texts()]
    assert "a run diverged here (step)" in legend
    # each line has its own marker, so that equal curves stay visible
    markers = [line.get_marker() for line in train.get_lines() if line.get_marker() not in ("x", "None")]
    assert len(set(markers)) >= min(len(markers), 8)
