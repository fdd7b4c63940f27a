"""Each figure is written as a real PNG with the expected number of series."""

import itertools

import matplotlib.image
import pandas as pd
import pytest

from analysis import figures
from analysis.collect import AnalysisError


def check_png(plot: figures.Plot, series: int) -> None:
    assert plot.series == series
    assert plot.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.path.stat().st_size > 10_000  # axes, labels and lines, not an empty canvas
    height, width, _ = matplotlib.image.imread(plot.path).shape
    assert width > 500 and height > 300


def tpb(recipe, seed, loss, lanes=4, depth=12, blocks=1, classic=1, hidden=256, **extra):
    lane_hidden = hidden // lanes if recipe == "sandwich" else hidden
    return {"run_id": f"{recipe}-{lanes}-{depth}-{blocks}-{classic}-{seed}", "architecture.arch": "tpb",
            "architecture.recipe": recipe, "architecture.lane_count": lanes, "architecture.lane_depth": depth,
            "architecture.tp_blocks": blocks, "architecture.n_classic_layers": classic, "architecture.hidden": hidden,
            "lane_hidden": lane_hidden, "protocol.seed": seed, "train_loss": loss, "eval_loss": loss,
            "label": f"{recipe}-L{lanes}-d{depth}-b{blocks}-c{classic}", **extra}


def baseline(arch, seed, loss):
    return {"run_id": f"{arch}-{seed}", "architecture.arch": arch, "architecture.recipe": "sandwich",
            "protocol.seed": seed, "train_loss": loss, "eval_loss": loss,
            "label": f"{arch}-H256-n4"}


def curves(runs: pd.DataFrame, steps: int = 12) -> pd.DataFrame:
    """train_loss history: each run decays towards its final loss."""
    return pd.DataFrame([
        {"run_id": r.run_id, "key": "train_loss", "step": s, "value": r.train_loss + 2.0 / s}
        for r in runs.itertuples() for s in range(1, steps + 1)
    ])


@pytest.fixture
def lane_runs():
    rows = [tpb(recipe, seed, 3.0 + 0.1 * lanes + 0.05 * seed + (0.2 if recipe == "burger" else 0), lanes=lanes)
            for recipe, lanes, seed in itertools.product(["sandwich", "burger"], [1, 2, 4, 8], [0, 1])]
    rows += [baseline("llama", 0, 3.05), baseline("llama", 1, 3.12)]
    return pd.DataFrame(rows)


def test_fig18_lane_count_with_baselines(lane_runs, tmp_path):
    check_png(figures.fig18_lane_count(lane_runs, tmp_path / "fig18.png"), 3)  # sandwich, burger, llama
    with_gpt2 = pd.concat([lane_runs, pd.DataFrame([baseline("gpt2", 0, 3.4)])], ignore_index=True)
    check_png(figures.fig18_lane_count(with_gpt2, tmp_path / "fig18b.png"), 4)
    sandwich_only = lane_runs[lane_runs["architecture.recipe"] == "sandwich"]
    check_png(figures.fig18_lane_count(sandwich_only, tmp_path / "fig18c.png"), 2)  # llama rows carry recipe too


def test_fig18_without_tpb_runs_is_a_clear_error(lane_runs, tmp_path):
    with pytest.raises(AnalysisError, match="no tpb run"):
        figures.fig18_lane_count(lane_runs[lane_runs["architecture.arch"] == "llama"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_fig19_aspect_ratio_numbers_and_plot(tmp_path):
    runs = pd.DataFrame([tpb("sandwich", 0, 3.3, depth=8), tpb("sandwich", 0, 3.2, depth=16),
                         tpb("burger", 0, 3.5, depth=8), tpb("burger", 1, 3.6, depth=8)])
    # sandwich: 256 / 4 lanes = 64 wide, / depth 8 = 8.0 and / 16 = 4.0; burger: 256 / 8 = 32.0
    assert figures.lane_aspect_ratio(runs).tolist() == [8.0, 4.0, 32.0, 32.0]
    assert figures.lane_aspect_ratio(runs.drop(columns="lane_hidden")).tolist() == [8.0, 4.0, 32.0, 32.0]
    check_png(figures.fig19_aspect_ratio(runs, tmp_path / "fig19.png"), 2)


def test_fig20_fig21(tmp_path):
    runs = pd.DataFrame([tpb(r, s, 3.2 + 0.01 * b + 0.02 * s, depth=12 // b, blocks=b)
                         for r, b, s in itertools.product(["sandwich", "burger"], [1, 2, 3, 4], [0, 1])])
    check_png(figures.fig20_tp_blocks(runs, tmp_path / "fig20.png"), 2)
    runs = pd.DataFrame([tpb(r, 0, 3.2 + 0.05 * c, depth=3, blocks=4, classic=c)
                         for r, c in itertools.product(["sandwich", "burger"], [1, 2, 3, 4])])
    runs = pd.concat([runs, pd.DataFrame([baseline("llama", 0, 3.1)])], ignore_index=True)
    check_png(figures.fig21_classic_layers(runs, tmp_path / "fig21.png"), 3)


def test_fig16_dataset_size(tmp_path):
    rows = []
    for label, steps, repeat in [("llama", 2000, 0), ("llama", 4000, 0), ("llama", 4000, 1), ("burger", 2000, 0),
                                 ("burger", 4000, 0), ("burger", 6000, 0), ("burger", 6000, 1)]:
        rows.append({"run_id": f"{label}{steps}{repeat}", "label": label, "protocol.steps": steps,
                     "protocol.batch_tokens": 1_000_000, "train_loss": 3.0 - steps / 1e4 + 0.01 * repeat})
    runs = pd.DataFrame(rows)
    assert figures.run_tokens(runs).tolist()[:2] == [2e9, 4e9]
    check_png(figures.fig16_dataset_size(runs, tmp_path / "fig16.png", metric="train_loss"), 2)


def test_fig17a_lr_range(tmp_path):
    runs = pd.DataFrame([{"run_id": f"lr{lr}", "protocol.lr": lr, "train_loss": 3 + lr * 100}
                         for lr in (3e-4, 1e-3, 3e-3)])
    check_png(figures.fig17a_lr_range(runs, curves(runs), tmp_path / "fig17a.png"), 3)


@pytest.fixture
def variance_runs():
    rows = [{"run_id": f"{a}-{s}-{seed}", "architecture.arch": a, "protocol.schedule": s, "protocol.seed": seed,
             "train_loss": (3.0 if a == "llama" else 3.4) + 0.05 * seed + (0.02 if s == "wsd" else 0.0)}
            for a, s, seed in itertools.product(["llama", "tpb"], ["cosine", "wsd"], range(3))]
    return pd.DataFrame(rows)


def test_fig17_variance_zoom_and_distance(variance_runs, tmp_path):
    history = curves(variance_runs, steps=40)
    check_png(figures.fig17b_variance(variance_runs, history, tmp_path / "b.png"), 4)
    check_png(figures.fig17c_variance_zoom(variance_runs, history, tmp_path / "c.png"), 4)
    check_png(figures.fig17d_extremum_distance(variance_runs, history, tmp_path / "d.png"), 2)  # one per schedule
    one_schedule = variance_runs[variance_runs["protocol.schedule"] == "wsd"]
    check_png(figures.fig17d_extremum_distance(one_schedule, history, tmp_path / "d1.png"), 1)


def test_fig17d_single_member_group_is_a_clear_error(variance_runs, tmp_path):
    lonely = variance_runs[~((variance_runs["architecture.arch"] == "tpb") & (variance_runs["protocol.seed"] > 0))]
    with pytest.raises(AnalysisError, match="fewer than 2 runs"):
        figures.fig17d_extremum_distance(lonely, curves(lonely), tmp_path / "d.png")


def test_fig22_delayed_comm(tmp_path):
    rows = [tpb("sandwich", seed, 3.0 + 0.1 * start + 0.05 * length - 0.01 * seed, **{
        "architecture.comm": True, "architecture.comm_start": start, "architecture.comm_interleave": inter,
        "architecture.comm_length": length}) | {"run_id": f"{start}{inter}{length}{seed}"}
        for start, inter, length, seed in [(0, 0, 1, 0), (0, 0, 1, 1), (1, 0, 2, 0), (2, 1, 4, 0), (2, 3, 6, 0)]]
    rows.append(tpb("sandwich", 0, 3.3, **{"architecture.comm": False, "architecture.comm_start": 0,
                                           "architecture.comm_interleave": 0, "architecture.comm_length": 1}))
    runs = pd.DataFrame(rows)
    check_png(figures.fig22a_delayed_comm_curves(runs, curves(runs), tmp_path / "a.png"), 4)  # comm=false left out
    check_png(figures.fig22b_delayed_comm_3d(runs, tmp_path / "b.png"), 4)  # 4 settings, seeds averaged


def test_study_plots(tmp_path):
    runs = pd.DataFrame({"run_id": list("abcde"), "trial": [0, 1, 2, 3, 4],
                         "train_loss": [3.2, 3.3, 3.0, 3.6, 3.1], "decode_speedup": [2.0, 1.5, 1.2, 3.0, None]})
    check_png(figures.pareto_front(runs, tmp_path / "pareto.png", metric="train_loss"), 2)
    check_png(figures.optimisation_history(runs, tmp_path / "history.png", metric="train_loss"), 2)
    assert figures.trial_numbers(runs.drop(columns="trial").assign(
        start_time=pd.to_datetime([5, 1, 3, 2, 4], unit="s"))).tolist() == [4, 0, 2, 1, 3]


def test_loss_curves_one_series_per_configuration(lane_runs, tmp_path):
    check_png(figures.loss_curves(lane_runs, curves(lane_runs), tmp_path / "curves.png"), 9)  # 8 tpb configs + llama


def test_loss_curves_draw_the_trailing_mean_of_the_train_loss(lane_runs, tmp_path):
    """Steps alternate 5, 3 (one batch's noise): over a 2-step window (10% of 20 steps, or given) every step
    from the second reads 4.0; the first is its own mean. Lines come in natural order, L2 before L8."""
    runs = lane_runs[(lane_runs["architecture.arch"] == "tpb") & (lane_runs["protocol.seed"] == 0)
                     & (lane_runs["architecture.recipe"] == "sandwich")]
    noisy = pd.DataFrame([{"run_id": r.run_id, "key": "train_loss", "step": s, "value": 5.0 if s % 2 else 3.0}
                          for r in runs.itertuples() for s in range(1, 21)])
    for window in (None, 2):
        plot = figures.loss_curves(runs, noisy, tmp_path / f"smooth{window}.png", window=window)
        [ax] = plot.figure.axes
        assert [line.get_label().split(" ")[0] for line in ax.lines] == [
            "sandwich-L1-d12-b1-c1", "sandwich-L2-d12-b1-c1", "sandwich-L4-d12-b1-c1", "sandwich-L8-d12-b1-c1"]
        for line in ax.lines:
            assert line.get_ydata().tolist() == [5.0] + [4.0] * 19
        assert ax.get_ylabel().startswith("train loss, trailing mean of")
    raw = figures.loss_curves(runs, noisy.assign(key="eval_loss"), tmp_path / "eval.png", metric="eval_loss")
    assert raw.figure.axes[0].lines[0].get_ydata().tolist()[:3] == [5.0, 3.0, 5.0]  # other metrics as logged


def test_each_recipe_has_its_shades_and_each_baseline_its_colour(lane_runs):
    names = figures.config_names(lane_runs)
    colors = figures.family_colors(lane_runs, names)
    assert len(colors) == 9 and colors["llama-H256-n4"] == "black"
    shades = [tuple(colors[f"{recipe}-L{lanes}-d12-b1-c1"]) for recipe in ("sandwich", "burger") for lanes in (1, 2, 4, 8)]
    assert len(set(shades)) == 8  # every configuration its own colour
    assert all(b > r for r, _, b, _ in shades[:4]) and all(r > b for r, _, b, _ in shades[4:])  # blues, oranges
    assert [sum(c[:3]) for c in shades[:4]] == sorted((sum(c[:3]) for c in shades[:4]), reverse=True)  # darker
    two_llamas = pd.concat([lane_runs, pd.DataFrame([{**baseline("llama", 0, 3.0), "label": "llama-H512-n2"}])], ignore_index=True)
    colors = figures.family_colors(two_llamas, figures.config_names(two_llamas))
    greys = {tuple(colors["llama-H256-n4"]), tuple(colors["llama-H512-n2"])}
    assert len(greys) == 2 and all(r == g == b for r, g, b, _ in greys)  # told apart, in greys


def band(plot: figures.Plot, label_start: str):
    """The (x, low, high) of the min-max band whose series label starts with `label_start`."""
    [poly] = [c for ax in plot.figure.axes for c in ax.collections
              if (c.get_gid() or "").startswith(f"band:{label_start}")]
    vertices = pd.DataFrame(poly.get_paths()[0].vertices, columns=["x", "y"])  # the polygon's corners
    edges = vertices.groupby("x")["y"].agg(["min", "max"])  # lower and upper edge at each x
    return edges.index.tolist(), edges["min"].tolist(), edges["max"].tolist()


def test_fig18_draws_the_mean_over_seeds_with_a_min_max_band(lane_runs, tmp_path):
    plot = figures.fig18_lane_count(lane_runs, tmp_path / "fig18.png")  # default estimate: eval_loss
    ax = plot.figure.axes[0]
    assert "mean over seeds, band = min–max" in ax.get_title()
    assert ax.get_ylabel() == "final eval loss (held-out)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "sandwich (mean over seeds, band = min–max, n=2)" in labels
    xs, low, high = band(plot, "sandwich")
    seeds = lane_runs[lane_runs["architecture.recipe"].eq("sandwich") & lane_runs["architecture.arch"].eq("tpb")]
    by_x = seeds.groupby("architecture.lane_count")["eval_loss"]
    assert xs == [1, 2, 4, 8]
    assert low == pytest.approx(by_x.min().tolist()) and high == pytest.approx(by_x.max().tolist())
    [bars] = [c for c in ax.containers if c.get_label().startswith("sandwich")]  # mean line + min/max caps
    assert bars.lines[0].get_ydata().tolist() == pytest.approx(by_x.mean().tolist())
    labelled = figures.fig18_lane_count(lane_runs, tmp_path / "b.png", metric="train_loss",
                                  label="mean train loss, last 20 steps")
    assert labelled.figure.axes[0].get_ylabel() == "mean train loss, last 20 steps"
