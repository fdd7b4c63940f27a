"""GPU paths (issue 14, item 4), every test marked `gpu`: where torch sees no CUDA device they skip with a reason
starting "gpu: " (tests/conftest.py), and a test needing more (2 devices, compute capability 8.0) skips the same way.

    bf16 step on the flash kernel   SDPA forced to FLASH_ATTENTION: the bf16 loss and gradients of Llama / TPB stay
                                    within a stated tolerance of the fp32 ones (same weights, same batch), a step trains
    fused AdamW                     trainers/optim.py builds the fused kernel on CUDA; its steps equal foreach AdamW's
    DDP over NCCL                   2 ranks under torchrun equal 1 process (tests/trainers/helpers.py runs, as the gloo
                                    test of test_distributed.py)
    torch.compile                   every architecture (llama, gpt2, sandwich and burger with communication): compiled
                                    logits, loss and gradients equal eager ones; bf16 autocast too
    checkpoint / resume             N steps, checkpoint, a fresh process resumes to 2N: bit for bit the uninterrupted
                                    2N run (deterministic algorithms, CUBLAS_WORKSPACE_CONFIG), fp32 and bf16 + dropout
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import build_model
from models.config import ModelConfig
from tests.trainers.helpers import EXIT_CODES, finish, rows, spawn, tiny_data, tiny_train
from trainers.checkpoint import load_latest
from trainers.config import TrainConfig
from trainers.data import prepare_data
from trainers.optim import build_optimizer, param_groups

pytestmark = pytest.mark.gpu

CUDA = "cuda"
MODELS = {
    # head dim 64 everywhere (flash's fast path), GQA in every attention (enable_gqa under flash)
    "llama": dict(arch="llama", hidden=128, n_layers=2, n_heads=2, n_kv_heads=1),
    "gpt2": dict(arch="gpt2", hidden=128, n_layers=2, n_heads=2, ffn_mult=4.0),
    "sandwich": dict(arch="tpb", recipe="sandwich", hidden=256, lane_count=4, lane_depth=3, lane_heads=1,
                     lane_kv_heads=1, n_classic_layers=1, n_heads=4, n_kv_heads=2, comm=True),
    "burger": dict(arch="tpb", recipe="burger", hidden=128, lane_count=4, lane_depth=3, lane_heads=2,
                   lane_kv_heads=1, n_classic_layers=1, n_heads=2, n_kv_heads=1, comm=True),
}
"""Small models of every architecture; sandwich and burger with delayed communication (sends at lane depths 0
and 1, received one layer deeper)."""
VOCAB, SEQ, BATCH = 512, 128, 8

BF16_LOSS_RTOL = 2e-2
"""bf16 vs fp32 loss of the same weights and batch. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%);
the matmul inputs of every layer are rounded (accumulation stays fp32, as the cross-entropy), so the logits move by
~0.5% and the loss, 2.5-4.5 nats after _pretrain, by well under 1%: 2% leaves room and still catches a wrong kernel (a
missing causal mask or scale moves the loss by whole nats)."""
BF16_GRAD_COSINE = 0.99
"""Cosine similarity of all bf16 vs all fp32 gradients, flattened (elementwise errors of a few % average out)."""
COMPILE_RTOL = 1e-4
"""fp32 compiled vs eager: inductor fuses elementwise work and reorders reductions (rounding ~1e-7 per op); TF32 is
off (torch's default for matmuls), so the matmuls are the same cuBLAS calls."""
DDP_RTOL = 1e-4
"""fp32, 2 NCCL ranks vs 1 process: gradients are summed in another order (NCCL ring vs accumulation) and CUDA's
attention / reduction kernels use atomics, so last-bit differences grow over 8 steps; the CPU gloo test gets 1e-5."""
FUSED_RTOL, FUSED_ATOL = 1e-5, 1e-7
"""Fused vs foreach AdamW: the same fp32 update formula, operations fused and ordered differently (a few ulps of
updates of ~1e-2)."""
DETERMINISTIC = [sys.executable, "-c",
                 "import runpy, sys, torch; torch.use_deterministic_algorithms(True); "
                 "torch.backends.cudnn.deterministic = True; torch.backends.cudnn.benchmark = False; "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]
"""A launcher for helpers.spawn: runs tests/trainers/helpers.py with deterministic algorithms switched on (cuDNN
attention is then never picked; flash and memory-efficient attention take their deterministic backward)."""
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
"""cuBLAS is deterministic only with a fixed workspace (required by use_deterministic_algorithms on CUDA >= 10.2)."""


def _config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**MODELS[name], "vocab_size": VOCAB, "max_seq_len": SEQ, **overrides})


def _batch(device: str = CUDA) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return idx[:, :-1], idx[:, 1:]


def _model(cfg: ModelConfig, device: str = CUDA) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg).to(device)


def _loss_and_grads(model, x, y, bf16: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(x, y)  # the trainer's path: head fused with an fp32 cross-entropy
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _pretrain(model, x, y, steps: int = 8) -> float:
    """fp32 AdamW steps on the batch, so the logits are far from uniform (at init the loss is ln V whatever the
    precision); returns the loss before the last step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _need_flash() -> None:
    if torch.cuda.get_device_capability() < (8, 0) or not torch.cuda.is_bf16_supported():
        pytest.skip("gpu: the bf16 flash attention kernel needs compute capability >= 8.0")


# --- bf16 on the flash kernel ---

@pytest.mark.parametrize("name", ["llama", "sandwich", "burger"])
def test_bf16_step_on_the_flash_kernel_matches_fp32(name):
    _need_flash()
    model, (x, y) = _model(_config(name)), _batch()
    assert _pretrain(model, x, y) < math.log(VOCAB) - 1  # the batch is partly learnt: a non-trivial loss
    fp32_loss, fp32_grads = _loss_and_grads(model, x, y, bf16=False)  # fp32: efficient / math kernels
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises "No available kernel" if any attention misses flash
        bf16_loss, bf16_grads = _loss_and_grads(model, x, y, bf16=True)
        assert math.isfinite(bf16_loss) and bool(bf16_grads.isfinite().all())
        assert bf16_loss == pytest.approx(fp32_loss, rel=BF16_LOSS_RTOL)
        cosine = torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0).item()
        assert cosine >= BF16_GRAD_COSINE, cosine

        optimizer = build_optimizer(model, TrainConfig(steps=1, warmup_frac=0.0, schedule="constant", lr=1e-3))
        with torch.autocast(CUDA, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        optimizer.step()  # one bf16 training step, as trainers/loop.py train_step
        with torch.no_grad(), torch.autocast(CUDA, dtype=torch.bfloat16):
            after = model(x, y).item()
    assert math.isfinite(after) and after < loss.item()  # the step lowered the loss of its own batch


# --- fused AdamW ---

def test_build_optimizer_is_fused_on_cuda_and_steps_like_foreach():
    cfg = TrainConfig(steps=10, warmup_frac=0.0, schedule="constant", lr=1e-2, weight_decay=0.1)
    model = _model(_config("llama"))
    optimizer = build_optimizer(model, cfg)
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]
    assert all(group["fused"] for group in optimizer.param_groups)
    reference = copy.deepcopy(model)
    foreach = torch.optim.AdamW(param_groups(reference, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                eps=1e-8, foreach=True)
    assert [g["weight_decay"] for g in foreach.param_groups] == [g["weight_decay"] for g in optimizer.param_groups]
    x, y = _batch()
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):  # three steps: the moments and the bias corrections take part
        _, grads = _loss_and_grads(model, x, y, bf16=False)
        offset = 0
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = grads[offset:offset + p.numel()].view_as(p).clone()
            q.grad = p.grad.clone()
            offset += p.numel()
        optimizer.step()
        foreach.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=FUSED_RTOL, atol=FUSED_ATOL)
    moved = max((p - s).abs().max().item() for p, s in zip(model.parameters(), start, strict=True))
    assert moved > 1e-3  # three updates of ~lr each: the comparison is not of untouched weights


# --- DDP over NCCL ---

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    prepare_data(tiny_data(path), context=32, progress=False)  # built once, read by every subprocess
    return str(path)


def test_ddp_over_nccl_two_ranks_match_one_process(cache, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("gpu: needs 2 CUDA devices")
    train = {"steps": 8, "batch_tokens": 1024}  # 4 micro-batches of 8 x 32: 1 process accumulates 4, each rank 2
    code, out = finish(spawn({"run_dir": str(tmp_path / "single"), "cache_dir": cache, "train": train}))
    assert code == 0, out
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    code, out = finish(spawn({"run_dir": str(tmp_path / "ddp"), "cache_dir": cache, "train": train},
                             launcher=launcher), timeout=300)
    assert code == 0 and out.count("RESULT ") == 2, out
    single, ddp = rows(tmp_path / "single"), rows(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 9))
    for a, b in zip(ddp, single, strict=True):
        for key in ("train_loss", "grad_norm", "eval_loss"):
            assert (key in a) == (key in b)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=DDP_RTOL), (a["step"], key)
        assert (a["lr"], a["tokens"]) == (b["lr"], b["tokens"])
    assert load_latest(tmp_path / "ddp").world_size == 2


# --- torch.compile ---

@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_equals_eager(name):
    torch._dynamo.reset()
    eager = _model(_config(name))
    compiled = copy.deepcopy(eager)
    compiled.compile()  # in place, as protocol.compile=true (trainers/loop.py)
    x, y = _batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=COMPILE_RTOL, atol=COMPILE_RTOL)
    loss_c, grads_c = _loss_and_grads(compiled, x, y, bf16=False)
    loss_e, grads_e = _loss_and_grads(eager, x, y, bf16=False)
    assert loss_c == pytest.approx(loss_e, rel=COMPILE_RTOL)
    assert ((grads_c - grads_e).norm() / grads_e.norm()).item() <= COMPILE_RTOL
    if torch.cuda.is_bf16_supported():  # the trainer's combination: compile + bf16 autocast
        with torch.no_grad(), torch.autocast(CUDA, dtype=torch.bfloat16):
            bf16_c, bf16_e = compiled(x, y).item(), eager(x, y).item()
        assert bf16_c == pytest.approx(bf16_e, rel=BF16_LOSS_RTOL)
        assert bf16_c == pytest.approx(loss_e, rel=BF16_LOSS_RTOL)


# --- checkpoint / resume on CUDA ---

COMPARED = ("train_loss", "lr", "grad_norm", "tokens", "eval_loss")


def _bits(rows_: list[dict]) -> dict[int, dict[str, str]]:
    return {r["step"]: {k: float(r[k]).hex() for k in COMPARED if k in r} for r in rows_}


def _deterministic(spec: dict):
    return spawn(spec, env=DETERMINISTIC_ENV, launcher=DETERMINISTIC)


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "dropout"), [("fp32", 0.0), ("bf16", 0.1)], ids=["fp32", "bf16-dropout"])
def test_cuda_resume_is_bitwise_equal_to_the_uninterrupted_run(cache, tmp_path, precision, dropout):
    """12 steps straight vs 6 steps (should_stop: checkpoint 6, exit "stopped") then a fresh process resuming to 12.
    With dropout the masks come from the CUDA generator: only its restored state (checkpoint.restore_rng) repeats
    the straight run's masks in steps 7-12."""
    common = {"cache_dir": cache, "train": {"precision": precision}, "model": {"dropout": dropout}}
    straight = tmp_path / "straight"
    reference = _deterministic({**common, "run_dir": str(straight)})  # runs while the interrupted one starts
    run_dir = tmp_path / "run"
    code, out = finish(_deterministic({**common, "run_dir": str(run_dir), "stop_at": 6}), timeout=300)
    assert code == EXIT_CODES["stopped"], out
    assert load_latest(run_dir).step == 6 and "cuda" in load_latest(run_dir).resume[0].rng  # ran on CUDA
    code, out = finish(_deterministic({**common, "run_dir": str(run_dir)}), timeout=300)
    assert code == 0, out
    code, out = finish(reference, timeout=300)
    assert code == 0, out

    resumed, uninterrupted = rows(run_dir), rows(straight)
    assert [r["step"] for r in resumed] == list(range(1, tiny_train().steps + 1))
    assert _bits(resumed) == _bits(uninterrupted)
    final, ref = load_latest(run_dir), load_latest(straight)
    assert final.step == ref.step == 12 and final.model.keys() == ref.model.keys()
    assert all(final.model[k].equal(ref.model[k]) for k in final.model)  # the final weights, bit for bit
