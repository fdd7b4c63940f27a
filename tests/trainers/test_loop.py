"""train() in-process on a tiny Llama: metrics, eval, checkpoints, stop, input errors, NaN; the loggers."""

from __future__ import annotations

import copy
import hashlib
import math
import signal

import pytest
import torch
from torch._dynamo.utils import counters

from models import build_model
from models.counts import flops_per_token
from tests.trainers.helpers import tiny_data, tiny_model, tiny_train
from trainers import checkpoint as ckpt
from trainers import loop
from trainers.data import prepare_data
from trainers.metrics_log import JsonlLogger, MultiLogger, read_jsonl
from trainers.optim import lr_at

METRICS = {"train_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"}


class Recorder:
    """A MetricLogger that keeps every row and counts flushes."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.flushes: list[int] = []

    def log(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def flush(self):
        self.flushes.append(self.rows[-1][0] if self.rows else 0)


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    cfg = tiny_data(tmp_path_factory.mktemp("cache"))
    prepare_data(cfg, context=32, progress=False)
    return cfg


@pytest.fixture(scope="module")
def finished(data_cfg, tmp_path_factory):
    """One straight 12-step run with a Recorder; shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("run")
    recorder = Recorder()
    result = loop.train(tiny_model(), tiny_train(), data_cfg, run_dir, logger=recorder)
    return run_dir, recorder, result


def _ckpt_steps(run_dir) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.sha256"))


def test_every_step_logs_the_metrics(finished):
    run_dir, recorder, result = finished
    cfg = tiny_train()
    assert [step for step, _ in recorder.rows] == list(range(1, 13))
    for step, metrics in recorder.rows:
        eval_step = step in (4, 8, 12)
        assert set(metrics) == METRICS | ({"eval_loss", "unigram_entropy"} if eval_step else set())
        assert metrics["tokens"] == step * 512
        assert metrics["lr"] == lr_at(step, cfg)
        assert all(math.isfinite(v) for v in metrics.values())
    first, last = recorder.rows[0][1]["train_loss"], recorder.rows[-1][1]["train_loss"]
    assert math.log(512) - 0.1 < first < math.log(512) + 0.1  # starts near uniform over the 512 ids
    assert last < first - 0.2  # and learns
    assert result == loop.TrainResult("finished", 12, last, recorder.rows[-1][1]["eval_loss"], 12 * 512)
    entropies = {metrics["unigram_entropy"] for step, metrics in recorder.rows if step in (4, 8, 12)}
    assert len(entropies) == 1 and 4.0 < entropies.pop() < math.log(512)  # a constant of the data, below uniform


def test_metrics_jsonl_is_the_same_record(finished):
    run_dir, recorder, _ = finished
    local = read_jsonl(run_dir / "metrics.jsonl")
    assert local == [{"step": step, **metrics} for step, metrics in recorder.rows]


def test_checkpoints_every_n_and_flush_at_each(finished):
    run_dir, recorder, _ = finished
    assert _ckpt_steps(run_dir) == [8, 12]  # every 4 steps, the last keep_ckpts=2 kept
    assert recorder.flushes[:3] == [4, 8, 12]  # metrics flushed with every checkpoint (then on exit)


def test_mfu_uses_the_peak_from_the_environment(data_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TPB_PEAK_FLOPS", "1e9")
    recorder = Recorder()
    loop.train(tiny_model(), tiny_train(steps=2), data_cfg, tmp_path, logger=recorder)
    fpt = flops_per_token(tiny_model(), 32)
    for _, m in recorder.rows:
        assert m["mfu"] == pytest.approx(fpt * m["tokens_per_s"] / 1e9, rel=1e-12)


def test_compile_auto_compiles_only_a_run_expected_to_train_long_eagerly(data_cfg, tmp_path, monkeypatch, capsys):
    """protocol.compile=auto (the default): the remaining steps' FLOPs at MFU 0.4 of the peak, against 600 s
    (analysis/planning.py). Module.compile is recorded, not run: the decision is what is tested here."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    tokens = 2 * 512  # tiny_train: 2 steps x batch_tokens 512
    fpt = flops_per_token(tiny_model(), 32)
    for peak, expected in ((fpt * tokens / 0.4 / 601, "compiled"), (fpt * tokens / 0.4 / 599, "eager")):
        monkeypatch.setenv("TPB_PEAK_FLOPS", repr(peak))
        loop.train(tiny_model(), tiny_train(steps=2), data_cfg, tmp_path / expected)
        out = capsys.readouterr().out
        assert f"protocol.compile=auto: {expected} (expected eager training {'601' if expected == 'compiled' else '599'} s" in out
    assert compiled == ["Llama"]  # once: the 601 s run
    loop.train(tiny_model(), tiny_train(steps=2, compile="false"), data_cfg, tmp_path / "off")  # as said
    assert compiled == ["Llama"] and "protocol.compile" not in capsys.readouterr().out


def test_finished_run_resumes_to_the_same_result_without_training(data_cfg, finished):
    run_dir, _, result = finished
    recorder = Recorder()
    again = loop.train(tiny_model(), tiny_train(), data_cfg, run_dir, logger=recorder)
    assert again == result and recorder.rows == []
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 12


def test_should_stop_checkpoints_and_returns_stopped(data_cfg, tmp_path):
    seen = []

    def should_stop(step, metrics):
        seen.append((step, set(metrics)))
        return step == 5

    result = loop.train(tiny_model(), tiny_train(), data_cfg, tmp_path, should_stop=should_stop)
    assert result.status == "stopped" and result.step == 5 and result.tokens == 5 * 512
    assert seen == [(1, METRICS), (2, METRICS), (3, METRICS), (4, METRICS | {"eval_loss", "unigram_entropy"}), (5, METRICS)]
    assert _ckpt_steps(tmp_path) == [4, 5]


def test_signal_handlers_are_restored(data_cfg, tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    loop.train(tiny_model(), tiny_train(steps=1), data_cfg, tmp_path)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == before


def test_bf16_autocast_changes_the_numbers_a_little(data_cfg, finished, tmp_path):
    recorder = Recorder()
    loop.train(tiny_model(), tiny_train(steps=2, precision="bf16"), data_cfg, tmp_path, logger=recorder)
    fp32 = [m["train_loss"] for _, m in finished[1].rows[:2]]
    bf16 = [m["train_loss"] for _, m in recorder.rows]
    assert bf16 != fp32  # autocast is on
    assert bf16 == pytest.approx(fp32, abs=0.02)


@pytest.mark.slow
def test_compiled_run_trains_the_same_model_and_checkpoints_the_same_keys(data_cfg, tmp_path):
    """protocol.compile: the losses of an eager run up to fused-kernel rounding, and checkpoints with the
    eager model's keys, from which an eager run resumes."""
    eager, compiled = Recorder(), Recorder()
    loop.train(tiny_model(), tiny_train(steps=4), data_cfg, tmp_path / "eager", logger=eager)
    counters.clear()
    loop.train(tiny_model(), tiny_train(steps=4, compile=True), data_cfg, tmp_path / "compiled", logger=compiled,
               should_stop=lambda step, metrics: step == 2)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the forward
    saved = ckpt.load_latest(tmp_path / "compiled")
    assert saved.step == 2 and set(saved.model) == set(build_model(tiny_model()).state_dict())
    loop.train(tiny_model(), tiny_train(steps=4), data_cfg, tmp_path / "compiled", logger=compiled)
    assert [step for step, _ in compiled.rows] == [1, 2, 3, 4]
    losses = [[m["train_loss"] for _, m in run.rows] for run in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_grad_inf_raises_before_the_update_and_keeps_checkpoints(data_cfg, tmp_path, monkeypatch):
    step_fn = loop.train_step

    def poisoned(run, n):
        if n == 3:
            run.params[0].register_hook(lambda g: g.fill_(math.inf))
        return step_fn(run, n)

    monkeypatch.setattr(loop, "train_step", poisoned)
    with pytest.raises(loop.NonFiniteError, match=r"^step 3: grad norm is inf \(stopped before the optimizer step\)$"):
        loop.train(tiny_model(), tiny_train(ckpt_every=2), data_cfg, tmp_path)
    files = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in files] == ["step_00000002.pt", "step_00000002.sha256"]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert digest == (tmp_path / "checkpoints" / "step_00000002.sha256").read_text()  # the good one, intact


def _snapshot(run) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in run.params], copy.deepcopy(run.optimizer.state_dict())


@pytest.mark.parametrize("poison", ["grad_inf", "loss_nan"])
def test_non_finite_step_leaves_parameters_and_optimizer_state_at_the_last_good_step(data_cfg, tmp_path,
                                                                                    monkeypatch, poison):
    """The NaN / inf check comes before optimizer.step(): after the NonFiniteError of step 3 the parameters and
    the AdamW state (moments, step counts, learning rate) are bitwise those after step 2, the last good step."""
    step_fn, seen = loop.train_step, {}

    def watched(run, n):
        seen["run"] = run
        if n == 3 and poison == "grad_inf":
            run.params[0].register_hook(lambda g: g.fill_(math.inf))
        if n == 3 and poison == "loss_nan":
            original = loop._loss
            monkeypatch.setattr(loop, "_loss", lambda *args: original(*args) * math.nan)
        metrics = step_fn(run, n)
        seen[n] = _snapshot(run)
        return metrics

    monkeypatch.setattr(loop, "train_step", watched)
    problem = "grad norm is inf" if poison == "grad_inf" else "loss is nan, grad norm is nan"
    with pytest.raises(loop.NonFiniteError, match=rf"^step 3: {problem} \(stopped before the optimizer step\)$"):
        loop.train(tiny_model(), tiny_train(), data_cfg, tmp_path)
    assert [n for n in seen if n != "run"] == [1, 2]
    run, (params, state) = seen["run"], seen[2]
    assert len(run.params) == len(params) > 0
    for name, (good, now) in enumerate(zip(params, run.params, strict=True)):
        assert torch.equal(now, good), f"parameter {name} changed by the non-finite step"
    now = run.optimizer.state_dict()
    assert now["param_groups"] == state["param_groups"]  # not even the learning rate of step 3 was set
    assert now["state"].keys() == state["state"].keys() and len(now["state"]) == len(params)
    for index, moments in state["state"].items():
        assert moments.keys() == now["state"][index].keys() and float(moments["step"]) == 2
        for key, value in moments.items():
            assert torch.equal(now["state"][index][key], value), f"optimizer state {index}.{key} changed"


# --- input errors: raised before any step (no metrics, no checkpoint) ---

def _assert_nothing_ran(run_dir) -> None:
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_unreachable_effective_batch(data_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"protocol.batch_tokens=500 is not a multiple of .* = 256"):
        loop.train(tiny_model(), tiny_train(batch_tokens=500), data_cfg, tmp_path)
    _assert_nothing_ran(tmp_path)


def test_tokenizer_vocab_larger_than_the_model(data_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"architecture.vocab_size=256 .* tokenizer vocabulary \(512"):
        loop.train(tiny_model(vocab_size=256), tiny_train(), data_cfg, tmp_path)
    _assert_nothing_ran(tmp_path)


def test_context_longer_than_the_model_allows(data_cfg, tmp_path):
    with pytest.raises(ValueError, match="protocol.context=128 exceeds architecture.max_seq_len=64"):
        loop.train(tiny_model(), tiny_train(context=128, batch_tokens=2048), data_cfg, tmp_path)
    _assert_nothing_ran(tmp_path)


def test_micro_batch_larger_than_the_corpus(data_cfg, tmp_path):
    with pytest.raises(ValueError, match="protocol.micro_batch"):
        loop.train(tiny_model(), tiny_train(micro_batch=8192, batch_tokens=8192 * 32), data_cfg, tmp_path)
    _assert_nothing_ran(tmp_path)


# --- loggers ---

def test_jsonl_keeps_rows_through_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(path)
    for step in range(1, 7):
        log.log({"train_loss": 1.0 / step, "grad_norm": math.inf if step == 6 else 1.0}, step)
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 7, "train_lo')  # torn by a SIGKILL
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5, 6]
    assert read_jsonl(path)[-1]["grad_norm"] == math.inf
    JsonlLogger(path, keep_through=4).close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    JsonlLogger(path).close()  # a fresh run (nothing to resume) starts an empty record
    assert read_jsonl(path) == []


def test_multi_logger_fans_out():
    a, b = Recorder(), Recorder()
    multi = MultiLogger(a, None, b)
    multi.log({"x": 1.0}, 1)
    multi.flush()
    assert a.rows == b.rows == [(1, {"x": 1.0})] and a.flushes == b.flushes == [1]
