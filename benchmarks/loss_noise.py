"""How much of the step-to-step movement of train_loss is the sampling noise of one batch (issue 10).
Run: python benchmarks/loss_noise.py [--steps 400] [--windows 2048] [dotlist overrides]
(about 3 minutes on 2 idle CPU cores at the defaults).

Trains the default CPU run (protocol=small, architecture=llama solved for its budget, data=stdlib: the
run benchmarks/trainer.py times) for --steps steps in a temporary folder (the data from the usual cache),
then prints:

    diff_std               std of the first differences of train_loss over the second half of the steps
                           (steps N/2+1 .. N: the figure issue 10 asks for, at N = 400)
    window_loss_std        std over --windows train windows (in a random order) of each window's mean loss under
                           the final weights: how much one context-long window differs from another
    windows_per_step       protocol.batch_tokens / protocol.context
    predicted_diff_std     sqrt(2) x window_loss_std / sqrt(windows_per_step): the first-difference std of two
                           independent batches of that many random windows, with no training at all
    measured_vs_predicted  diff_std / predicted_diff_std (about 1: the movement is the batch's sampling noise)
    windows_for_<T>        windows per step at which predicted_diff_std falls to T (0.15)
    batch_tokens_for_<T>   the same in tokens

Nothing here can lower the sampling part but more windows per step: the data order decides which windows
a batch holds, not how much random windows differ.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/trainer.py: the default run

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from trainer import default_run  # noqa: E402

from trainers.config import DataConfig  # noqa: E402
from trainers.data import prepare_data  # noqa: E402
from trainers.loader import Loader  # noqa: E402
from trainers.loop import train  # noqa: E402
from trainers.sample import load_model  # noqa: E402

TARGET = 0.15


class LossByStep:
    """The train_loss of every optimizer step (a step logged twice, e.g. with its eval, counts once)."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "train_loss" in metrics:
            self.loss[step] = metrics["train_loss"]

    def flush(self) -> None:
        pass


def window_losses(model, tokens: np.ndarray, context: int, n: int, seed: int = 1, batch: int = 64) -> np.ndarray:
    """Mean next-token loss of each of ~n distinct train windows, served in a random order by the trainer's
    own Loader (seed 1: not the order training began with), fp32, no grad."""
    loader = Loader(tokens, context, batch, seed=seed)
    out = []
    with torch.no_grad():
        for _ in range(max(1, min(n, loader.n_sequences) // batch)):
            x, y = loader.next()
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="none")
            out.append(loss.view(y.shape).mean(dim=1))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--windows", type=int, default=2048)
    args, overrides = parser.parse_known_args()
    if args.steps < 6:
        parser.error(f"--steps={args.steps}: needs >= 6 (first differences over the second half)")
    model_cfg, train_cfg, data_fields, params = default_run([f"protocol.steps={args.steps}", *overrides])
    print(f"params: {params}")
    print(f"steps: {train_cfg.steps}")
    print(f"batch_tokens: {train_cfg.batch_tokens}")
    with tempfile.TemporaryDirectory() as tmp:
        data_cfg = DataConfig(**data_fields)  # the usual cache ($TPB_CACHE, else ~/.cache/tpb-sweeps)
        recorder = LossByStep()
        train(model_cfg, train_cfg, data_cfg, Path(tmp) / "run", logger=recorder)
        losses = [recorder.loss[step] for step in sorted(recorder.loss)]
        second_half = losses[len(losses) // 2:]
        diff_std = statistics.stdev(np.diff(second_half))
        model, _ = load_model(Path(tmp) / "run", model_cfg)
        data = prepare_data(data_cfg, train_cfg.context, progress=False)
        per_window = window_losses(model, data.train, train_cfg.context, args.windows)
    windows = train_cfg.batch_tokens // train_cfg.context
    window_std = float(per_window.std(ddof=1))
    predicted = math.sqrt(2.0) * window_std / math.sqrt(windows)
    needed = math.ceil(2.0 * window_std ** 2 / TARGET ** 2)
    print(f"final_train_loss_mean: {statistics.fmean(losses[-len(losses) // 10:]):.4f}")
    print(f"diff_std: {diff_std:.4f}")
    print(f"window_loss_std: {window_std:.4f}")
    print(f"windows_per_step: {windows}")
    print(f"predicted_diff_std: {predicted:.4f}")
    print(f"measured_vs_predicted: {diff_std / predicted:.3f}")
    print(f"windows_for_{TARGET}: {needed}")
    print(f"batch_tokens_for_{TARGET}: {needed * train_cfg.context}")


if __name__ == "__main__":
    main()
