"""Tiny configs for the trainer tests, and a subprocess entry point that runs trainers.loop.train.

    python tests/trainers/helpers.py '<spec json>'     (or under torchrun / with Slurm variables)

spec: {"run_dir": str, "cache_dir": str, "train": {TrainConfig overrides}, "model": {ModelConfig
overrides}, "pause_before": n (the process SIGSTOPs itself before step n: a test then signals or kills
it at an exact step, see wait_until_paused()), "nan_loss_at": n (the loss of step n is NaN),
"stop_at": step at which should_stop returns True}.
Prints one JSON line "RESULT {...}" with the TrainResult and exits with EXIT_CODES[status], or
EXIT_NONFINITE after printing "NONFINITE <message>" when train() raises NonFiniteError.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make the project importable without installing it
    sys.path.insert(0, str(ROOT))

from models.config import ModelConfig  # noqa: E402
from trainers import loop  # noqa: E402
from trainers.config import DataConfig, TrainConfig  # noqa: E402
from trainers.metrics_log import read_jsonl  # noqa: E402

EXIT_CODES = {"finished": 0, "preempted": 3, "stopped": 4}
EXIT_NONFINITE = 5
HELPER = Path(__file__).resolve()


def tiny_model(**overrides) -> ModelConfig:
    """A 37,024-parameter Llama: vocab 512 (the test corpus' BPE), hidden 32, 2 layers."""
    fields = dict(arch="llama", vocab_size=512, hidden=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**fields, **overrides})


def tiny_train(**overrides) -> TrainConfig:
    """12 steps of 2 x 8 x 32 tokens in fp32, one thread, a checkpoint every 4 steps."""
    fields = dict(steps=12, context=32, batch_tokens=512, micro_batch=8, lr=3e-3, warmup_frac=0.25,
                  precision="fp32", eval_every=4, eval_batches=2, ckpt_every=4, keep_ckpts=2, seed=0, threads=1)
    return TrainConfig(**{**fields, **overrides})


def tiny_data(cache_dir: str | Path) -> DataConfig:
    """The first 20 standard-library files, a 512-token BPE, 4096 test tokens (about 1 s to build once)."""
    return DataConfig(source="stdlib", name="stdlib20", max_docs=20, vocab_size=512, test_tokens=4096,
                      cache_dir=str(cache_dir))


# --- used by the tests: start the entry point in a real process, watch its metrics ---

def spawn(spec: dict, env: dict[str, str | None] | None = None, launcher: list[str] | None = None
          ) -> subprocess.Popen:
    """Start `python helpers.py spec` (behind `launcher`, e.g. torchrun, if given) with extra environment
    variables (None unsets one); stderr is appended to <run_dir>.stderr, stdout (RESULT / NONFINITE) piped."""
    cmd = (launcher or [sys.executable]) + [str(HELPER), json.dumps(spec)]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    child_env = {k: v for k, v in child_env.items() if v is not None}
    with open(f"{spec['run_dir']}.stderr", "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=log, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def rows(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


def wait_until_paused(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the child stopped itself (state T in /proc, Linux): it sits before its pause step."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "T":
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before pausing")
        if time.monotonic() > deadline:
            raise AssertionError(f"process did not pause within {timeout} s")
        time.sleep(0.01)


def _pause_before(at: int) -> None:
    step = loop.train_step

    def pausing(run, n):
        if n == at:
            os.kill(os.getpid(), signal.SIGSTOP)  # the test resumes us with SIGCONT (or kills us)
        return step(run, n)

    loop.train_step = pausing


def _nan_loss_at(at: int) -> None:
    step = loop.train_step

    def poisoned(run, n):
        if n != at:
            return step(run, n)
        original = loop._loss
        loop._loss = lambda *args: original(*args) * math.nan
        try:
            return step(run, n)
        finally:
            loop._loss = original

    loop.train_step = poisoned


def main(spec: dict) -> int:
    if spec.get("pause_before"):
        _pause_before(spec["pause_before"])
    if spec.get("nan_loss_at"):
        _nan_loss_at(spec["nan_loss_at"])
    stop_at = spec.get("stop_at")
    should_stop = (lambda step, metrics: step >= stop_at) if stop_at else None
    try:
        result = loop.train(tiny_model(**spec.get("model", {})), tiny_train(**spec.get("train", {})),
                            tiny_data(spec["cache_dir"]), spec["run_dir"], should_stop=should_stop)
    except loop.NonFiniteError as error:
        _say(f"NONFINITE {error}")
        return EXIT_NONFINITE
    _say(f"RESULT {json.dumps(asdict(result))}")
    return EXIT_CODES[result.status]


def _say(line: str) -> None:
    """One write per line: ranks under torchrun share an unbuffered pipe, and print() writes its pieces
    separately, so two ranks' lines could interleave ("RESULTRESULT  {..."). A write below PIPE_BUF is atomic."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
