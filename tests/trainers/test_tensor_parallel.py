"""Tensor-parallel decode (trainers/tensor_parallel.py, spawned by trainers/tp_measure.py) on real processes:
2 ranks over gloo, one thread each, give the single-process logits within 1e-5 (fp32) and count their
collectives as models.counts does."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from models.counts import sync_count
from tests.models.tpb_oracle import randomize
from trainers.tensor_parallel import Comm, check_world, shard_model
from trainers.tp_measure import measure_tp, spawn, verify


def tpb(recipe: str, **kw) -> ModelConfig:
    fields = dict(arch="tpb", recipe=recipe, vocab_size=53, hidden=32, n_heads=4, n_kv_heads=2, max_seq_len=32,
                  lane_count=4, lane_depth=3, tp_blocks=1, n_classic_layers=1, lane_heads=2, lane_kv_heads=1,
                  lane_ffn_mult=1.5, tied=False)
    return ModelConfig(**{**fields, **kw})


KRAKEN = dict(comm=True, comm_start=0, comm_interleave=0, comm_length=1)
CONFIGS = {
    "llama": ModelConfig(arch="llama", vocab_size=53, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32),
    "sandwich": tpb("sandwich"),
    "burger": tpb("burger", n_classic_layers=0),
    "sandwich_comm_mixing": tpb("sandwich", tp_blocks=2, n_classic_layers=1, **KRAKEN),
    "burger_comm_mixing": tpb("burger", tp_blocks=2, n_classic_layers=2, comm=True, comm_start=0,
                              comm_interleave=0, comm_length=2, comm_reduction="mean"),
}


@pytest.fixture(scope="module")
def two_ranks():
    """One spawn of 2 gloo processes for the whole module: every config checked inside it."""
    return spawn(verify, 2, CONFIGS, 0, 2, 5, 4, randomize)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_single_process(two_ranks, name):
    got = two_ranks[name]
    assert got["scale"] > 0.1
    assert got["max_abs_diff"] <= 1e-5, got


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_collectives_counted(two_ranks, name):
    cfg, got = CONFIGS[name], two_ranks[name]
    assert got["syncs"] == sync_count(cfg) and got["steady"]
    # delayed communication: one message to the other rank per (send, receive) pair and block
    assert got["messages"] == cfg.tp_blocks * len(cfg.comm_schedule())


def test_one_rank_equals_the_model():
    """G = 1 runs the same sharding code without a process group: no collective, same logits."""
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        randomize(model)
        shard, comm = shard_model(model, 0, 1), Comm(1)
        idx = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
        cache = shard.new_cache(2, 7)
        got = torch.cat([shard(idx[:, :4], cache, 0, comm), *(shard(idx[:, p:p + 1], cache, p, comm)
                                                              for p in range(4, 7))], dim=1)
        with torch.no_grad():
            torch.testing.assert_close(got, model(idx), rtol=0, atol=1e-5, msg=name)
        assert comm.syncs == comm.messages == 0


def test_refuses_a_world_that_does_not_divide():
    with pytest.raises(ValueError, match=r"lane_count=4 is not a multiple of the tensor-parallel world size G=3"):
        check_world(tpb("sandwich", n_classic_layers=0), 3)
    with pytest.raises(ValueError, match=r"n_kv_heads=2 is not a multiple .* G=4"):
        check_world(CONFIGS["llama"], 4)
    with pytest.raises(ValueError, match=r"n_heads=4 is not a multiple .* G=8"):
        check_world(tpb("sandwich", lane_count=8, hidden=64), 8)
    with pytest.raises(ValueError, match="arch='gpt2'"):
        check_world(ModelConfig(arch="gpt2"), 2)
    check_world(tpb("burger", n_classic_layers=0, lane_count=8, hidden=64), 8)  # no dense layer: lanes only


@pytest.mark.slow
def test_measure_two_ranks():
    got = spawn(measure_tp, 2, CONFIGS["sandwich_comm_mixing"], 0, 1, 4, 6, 2)
    assert got["syncs"] == 2 * (1 + 2) and got["messages"] == 2 * 2
    assert 0 < got["sync_s"] < got["step_s"] and got["t_sync_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="gpu: needs 2 CUDA devices")
def test_two_gpus_nccl_equal_single_process():
    got = spawn(verify, 2, CONFIGS, 0, 2, 5, 4, randomize)
    for name, cfg in CONFIGS.items():
        assert got[name]["max_abs_diff"] <= 1e-4 and got[name]["syncs"] == sync_count(cfg), name
