import numpy as np
import pytest
import torch

from trainers.loader import Loader, eval_batches


def take(loader: Loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next() for _ in range(n)]


def test_sequence_k_is_the_kth_window_and_y_is_x_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = Loader(tokens, context=8, micro_batch=3)
    x, y = loader.next()
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (3, 8)
    assert x[:, 0].tolist() == [0, 8, 16]  # sequence k starts at k * context
    assert x[1].tolist() == list(range(8, 16))
    assert y[1].tolist() == list(range(9, 17))
    x, _ = loader.next()
    assert x[:, 0].tolist() == [24, 32, 40]


def test_large_uint16_ids_survive_the_int64_conversion():
    tokens = np.arange(65535 - 99, 65536, dtype=np.uint16)  # 100 ids up to 65535
    x, y = Loader(tokens, context=9, micro_batch=11).next()
    assert y.max().item() == 65535
    assert x[0, 0].item() == 65436


def test_two_loaders_give_identical_batches():
    tokens = np.random.default_rng(0).integers(0, 4096, 5000).astype(np.uint16)
    a, b = Loader(tokens, 16, 4), Loader(tokens, 16, 4)
    for (xa, ya), (xb, yb) in zip(take(a, 20), take(b, 20), strict=True):  # 20 x 4 > 312 sequences: wraps once
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_one_rank_with_2m_sees_what_two_ranks_with_m_see():
    tokens = np.random.default_rng(1).integers(0, 500, 3001).astype(np.uint16)
    single = Loader(tokens, context=10, micro_batch=6)
    ranks = [Loader(tokens, context=10, micro_batch=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(120):  # 300 sequences, 6 per step: 50 steps per epoch, so this crosses two wraps
        x, y = single.next()
        parts = [loader.next() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict() == {"cursor": 120 % 50 * 6, "epoch": 2}


def test_state_round_trip_resumes_the_exact_next_batch():
    tokens = np.random.default_rng(2).integers(0, 4096, 4000).astype(np.uint16)
    straight = Loader(tokens, 32, 4, rank=1, world_size=2)
    take(straight, 17)  # 124 sequences -> 15 steps per epoch: 17 steps wrap once
    state = straight.state_dict()
    assert state == {"cursor": 2 * 8, "epoch": 1}
    resumed = Loader(tokens, 32, 4, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(take(straight, 30), take(resumed, 30), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_wraps_to_sequence_zero_when_a_step_would_run_past_the_end():
    tokens = np.arange(41, dtype=np.uint16)  # 10 sequences of 4 (+1 target)
    loader = Loader(tokens, context=4, micro_batch=4)
    starts = [loader.next()[0][:, 0].tolist() for _ in range(4)]
    # steps take sequences 0-3, 4-7; 8-11 would run past 9, so 8-9 are skipped and the epoch restarts
    assert starts == [[0, 4, 8, 12], [16, 20, 24, 28], [0, 4, 8, 12], [16, 20, 24, 28]]
    assert loader.state_dict() == {"cursor": 8, "epoch": 1}
    x, y = Loader(tokens, context=4, micro_batch=10).next()  # exactly one step: the last target is token 40
    assert y[-1, -1].item() == 40


def test_bad_inputs_raise_clear_errors():
    tokens = np.arange(100, dtype=np.uint16)  # 9 sequences of 11
    with pytest.raises(ValueError, match=r"9 sequences of protocol.context=11.*micro_batch x world_size = 5 x 2"):
        Loader(tokens, context=11, micro_batch=5, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        Loader(tokens, context=4, micro_batch=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_batch=0"):
        Loader(tokens, context=4, micro_batch=0)
    loader = Loader(tokens, context=4, micro_batch=2)
    with pytest.raises(ValueError, match=r"cursor must be in \[0, 24\]"):
        loader.load_state_dict({"cursor": 25, "epoch": 0})


def test_eval_batches_are_the_first_sequences_of_the_split_each_once():
    tokens = np.arange(201, dtype=np.uint16)  # 20 sequences of 10
    batches = list(eval_batches(tokens, context=10, micro_batch=8, n=2))
    assert [x.shape[0] for x, _ in batches] == [8, 8]
    assert torch.equal(batches[1][0][0], torch.arange(80, 90))
    everything = list(eval_batches(tokens, context=10, micro_batch=8, n=100))
    assert [x.shape[0] for x, _ in everything] == [8, 8, 4]
    firsts = torch.cat([x[:, 0] for x, _ in everything])
    assert firsts.tolist() == list(range(0, 200, 10))
    assert everything[-1][1][-1, -1].item() == 200
    again = list(eval_batches(tokens, context=10, micro_batch=8, n=100))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(everything, again, strict=True))
