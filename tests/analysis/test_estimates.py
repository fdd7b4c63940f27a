"""The final-loss estimates on a hand-made history."""

import math

import pandas as pd
import pytest

from analysis import estimates as E
from analysis.collect import AnalysisError


def history() -> pd.DataFrame:
    """run a: train loss 20 - step over 20 steps (19 ... 0), eval 5.0 at step 10 and 4.0 at step 20;
    run b: train loss 10.0 over 30 steps, step 29 NaN (a diverged step), no eval."""
    rows = [("a", "train_loss", s, 20.0 - s) for s in range(1, 21)]
    rows += [("a", "eval_loss", 10, 5.0), ("a", "eval_loss", 20, 4.0)]
    rows += [("b", "train_loss", s, math.nan if s == 29 else 10.0) for s in range(1, 31)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def test_train_loss_mean_default_window_is_the_last_tenth():
    means = E.train_loss_mean(history())
    assert E.run_windows(history()).to_dict() == {"a": 2, "b": 3}  # 10% of 20 and of 30 steps
    assert means["a"] == pytest.approx((1.0 + 0.0) / 2)  # steps 19, 20
    assert means["b"] == pytest.approx(10.0)  # steps 28-30, the NaN left out


def test_train_loss_mean_given_window_and_curve():
    assert E.train_loss_mean(history(), window=5)["a"] == pytest.approx((4 + 3 + 2 + 1 + 0) / 5)
    curve = E.estimate_curves(history(), "train_loss_mean", window=5)
    a = curve[curve["run_id"] == "a"].set_index("step")["value"]
    assert a[1] == 19.0 and a[2] == pytest.approx(18.5)  # fewer steps than the window: what there is
    assert a[10] == pytest.approx((14 + 13 + 12 + 11 + 10) / 5)
    assert a[20] == E.train_loss_mean(history(), window=5)["a"]  # the curve ends at the final estimate
    evals = E.estimate_curves(history(), "eval_loss")
    assert evals[["run_id", "step", "value"]].values.tolist() == [["a", 10, 5.0], ["a", 20, 4.0]]


def test_with_estimates_labels_and_missing_note():
    runs = pd.DataFrame({"run_id": ["a", "b"], "run_name": ["run-a", "run-b"], "train_loss": [0.0, 10.0],
                         "eval_loss": [4.0, math.nan]})
    out = E.with_estimates(runs, history(), window=5)
    assert out["train_loss_mean"].tolist() == pytest.approx([2.0, 10.0])
    assert E.with_estimates(runs.drop(columns="eval_loss"), history())["eval_loss"].isna().all()
    note = E.missing_note(out, "eval_loss")
    assert note.startswith("1 of 2 finished runs have no eval_loss (no eval logged)") and "run-b" in note
    assert E.missing_note(out, "train_loss_mean") is None
    assert E.label("eval_loss") == "final eval loss (held-out)"
    assert E.label("train_loss_mean", 20) == "mean train loss, last 20 steps"
    assert E.label("train_loss_mean") == "mean train loss, last 10% of steps"
    assert E.label("train_loss") == "last-step train loss (one batch)"
    assert E.check(None) == "eval_loss"
    with pytest.raises(AnalysisError, match="allowed estimates: eval_loss, train_loss_mean, train_loss"):
        E.check("loss")
    with pytest.raises(AnalysisError, match="window=0"):
        E.check("train_loss_mean", 0)
