import numpy as np
import pytest
import torch

from trainers.loader import Loader, eval_batches, window_order


def take(loader: Loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next() for _ in range(n)]


def starts(x: torch.Tensor, context: int) -> list[int]:
    """Window numbers of a batch drawn from np.arange tokens (token value = position)."""
    return (x[:, 0] // context).tolist()


def test_batches_are_the_windows_of_the_seeded_permutation_and_y_is_x_shifted():
    tokens = np.arange(1000, dtype=np.uint16)  # 124 windows of 8
    loader = Loader(tokens, context=8, micro_batch=3, seed=5)
    order = window_order(124, seed=5)
    assert sorted(order.tolist()) == list(range(124)) and order[:10].tolist() != list(range(10))
    x, y = loader.next()
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (3, 8)
    assert starts(x, 8) == order[:3].tolist()  # window k starts at k * context
    k = int(order[1])
    assert x[1].tolist() == list(range(8 * k, 8 * k + 8))
    assert y[1].tolist() == list(range(8 * k + 1, 8 * k + 9))
    x, _ = loader.next()
    assert starts(x, 8) == order[3:6].tolist()


def test_every_window_is_served_once_per_epoch():
    tokens = np.arange(64 * 96 + 1, dtype=np.uint16)  # 96 windows, 12 steps of 8 per epoch
    for reshuffle in (False, True):
        loader = Loader(tokens, context=64, micro_batch=4, world_size=1, seed=1, reshuffle=reshuffle)
        for epoch in range(3):
            seen = [w for _ in range(24) for w in starts(loader.next()[0], 64)]  # 24 x 4 = 96
            assert sorted(seen) == list(range(96)), (reshuffle, epoch)
    # 100 windows, 8 per step: 12 steps per epoch, the epoch's last 4 permuted windows are skipped
    loader = Loader(np.arange(64 * 100 + 1, dtype=np.uint16), context=64, micro_batch=8)
    seen = [w for _ in range(12) for w in starts(loader.next()[0], 64)]
    assert sorted(seen) == sorted(window_order(100, 0)[:96].tolist()) and len(set(seen)) == 96


def test_a_micro_batch_mixes_windows_from_all_over_the_split():
    n_windows = 50_000  # about the stdlib train split's 3.4M tokens in 64-token windows
    loader = Loader(np.arange(64 * n_windows + 1, dtype=np.uint32), context=64, micro_batch=16)
    spans = []
    for _ in range(100):
        where = np.array(starts(loader.next()[0], 64))
        spans.append((where.max() - where.min()) / n_windows)
        assert len(np.unique(where // (n_windows // 100))) >= 12  # >= 12 of 16 in different 1% slices
    assert spans[0] > 0.5 and min(spans) > 0.5 and np.mean(spans) > 0.8  # sequential order: 16 / 50,000


def test_order_is_fixed_by_the_data_seed_alone():
    tokens = np.arange(32 * 500 + 1, dtype=np.uint16)
    first = [starts(Loader(tokens, 32, 10, seed=7).next()[0], 32) for _ in range(2)]
    assert first[0] == first[1]
    same = window_order(500, 7)
    other = window_order(500, 8)
    assert np.array_equal(same, window_order(500, 7))
    assert (same == other).mean() < 0.02  # a different data.seed gives a different order
    assert starts(Loader(tokens, 32, 10, seed=8).next()[0], 32) == other[:10].tolist()


def test_reshuffle_changes_later_epochs_only_when_on():
    tokens = np.arange(16 * 40 + 1, dtype=np.uint16)  # 40 windows, 8 per step: 5 steps per epoch

    def epochs(reshuffle: bool) -> list[list[int]]:
        loader = Loader(tokens, 16, 8, seed=3, reshuffle=reshuffle)
        return [[w for _ in range(5) for w in starts(loader.next()[0], 16)] for _ in range(3)]

    fixed, reshuffled = epochs(False), epochs(True)
    assert fixed[0] == fixed[1] == fixed[2] == window_order(40, 3).tolist()
    assert reshuffled[0] == fixed[0]  # epoch 0 is the same either way
    assert reshuffled[1] != fixed[1] and reshuffled[2] != reshuffled[1]
    assert reshuffled[1] == window_order(40, 3, epoch=1).tolist()
    assert all(sorted(e) == list(range(40)) for e in reshuffled)


def test_large_uint16_ids_survive_the_int64_conversion():
    tokens = np.arange(65535 - 99, 65536, dtype=np.uint16)  # 100 ids up to 65535
    x, y = Loader(tokens, context=9, micro_batch=11).next()
    assert y.max().item() == 65535  # 11 windows of 9: every token but none past the last is served
    assert x.min().item() == 65436


def test_two_loaders_give_identical_batches():
    tokens = np.random.default_rng(0).integers(0, 4096, 5000).astype(np.uint16)
    a, b = Loader(tokens, 16, 4), Loader(tokens, 16, 4)
    for (xa, ya), (xb, yb) in zip(take(a, 20), take(b, 20), strict=True):  # 20 x 4 > 312 sequences: wraps once
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("reshuffle", [False, True])
def test_one_rank_with_2m_sees_what_two_ranks_with_m_see(reshuffle):
    tokens = np.random.default_rng(1).integers(0, 500, 3001).astype(np.uint16)
    single = Loader(tokens, context=10, micro_batch=6, seed=4, reshuffle=reshuffle)
    ranks = [Loader(tokens, context=10, micro_batch=3, rank=r, world_size=2, seed=4, reshuffle=reshuffle)
             for r in range(2)]
    for _ in range(120):  # 300 sequences, 6 per step: 50 steps per epoch, so this crosses two wraps
        x, y = single.next()
        parts = [loader.next() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict() == {"cursor": 120 % 50 * 6, "epoch": 2}


@pytest.mark.parametrize(("reshuffle", "steps"), [(False, 17), (True, 17), (True, 7)])
def test_state_round_trip_resumes_the_exact_next_batch(reshuffle, steps):
    tokens = np.random.default_rng(2).integers(0, 4096, 4000).astype(np.uint16)
    straight = Loader(tokens, 32, 4, rank=1, world_size=2, seed=9, reshuffle=reshuffle)
    take(straight, steps)  # 124 sequences -> 15 steps per epoch: 17 steps wrap once, 7 stay mid-epoch 0
    state = straight.state_dict()
    assert state == ({"cursor": 2 * 8, "epoch": 1} if steps == 17 else {"cursor": 7 * 8, "epoch": 0})
    resumed = Loader(tokens, 32, 4, rank=1, world_size=2, seed=9, reshuffle=reshuffle)
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(take(straight, 30), take(resumed, 30), strict=True):  # crosses 2 epochs
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_step_that_would_run_past_the_end_starts_the_next_epoch():
    tokens = np.arange(41, dtype=np.uint16)  # 10 windows of 4 (+1 target)
    loader = Loader(tokens, context=4, micro_batch=4)
    order = window_order(10, 0).tolist()
    served = [starts(loader.next()[0], 4) for _ in range(4)]
    # steps take entries 0-3, 4-7; 8-11 would run past 9, so entries 8-9 are skipped and the epoch restarts
    assert served == [order[0:4], order[4:8], order[0:4], order[4:8]]
    assert loader.state_dict() == {"cursor": 8, "epoch": 1}
    x, y = Loader(tokens, context=4, micro_batch=10).next()  # exactly one step: every window, token 40 a target
    assert sorted(starts(x, 4)) == list(range(10)) and y.max().item() == 40


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


def test_eval_batches_spread_over_the_whole_split_each_window_once():
    tokens = np.arange(201, dtype=np.uint16)  # 20 windows of 10
    batches = list(eval_batches(tokens, context=10, micro_batch=4, n=2))  # 8 of the 20 windows
    assert [x.shape[0] for x, _ in batches] == [4, 4]
    firsts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert firsts == [0, 20, 50, 70, 100, 120, 150, 170]  # windows 0, 2, 5, 7, 10, 12, 15, 17
    assert torch.equal(batches[0][1][1], torch.arange(21, 31))  # targets: inputs shifted by one
    everything = list(eval_batches(tokens, context=10, micro_batch=8, n=100))
    assert [x.shape[0] for x, _ in everything] == [8, 8, 4]
    firsts = torch.cat([x[:, 0] for x, _ in everything])
    assert firsts.tolist() == list(range(0, 200, 10))
    assert everything[-1][1][-1, -1].item() == 200
    again = list(eval_batches(tokens, context=10, micro_batch=8, n=100))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(everything, again, strict=True))


def test_eval_windows_reach_the_last_document_of_a_large_split():
    from trainers.loader import eval_windows

    index = eval_windows(100_000, 512)
    assert len(index) == len(set(index.tolist())) == 512
    assert index[0] == 0 and index[-1] == 511 * 100_000 // 512  # within one spacing of the end
    assert np.all(np.diff(index) >= 100_000 // 512)
    assert eval_windows(7, 10).tolist() == list(range(7))


def test_the_loop_serves_the_data_seed_order_whatever_the_protocol_seed(tmp_path, monkeypatch):
    from tests.trainers.helpers import tiny_data, tiny_model, tiny_train
    from trainers import loop
    from trainers.config import DataConfig

    served: list[torch.Tensor] = []

    class Recording(Loader):
        def next(self):
            x, y = super().next()
            served.append(x.clone())
            return x, y

    monkeypatch.setattr(loop, "Loader", Recording)

    def batches(protocol_seed: int, data_seed: int) -> torch.Tensor:
        served.clear()
        data = DataConfig(**{**tiny_data(tmp_path / "cache").__dict__, "seed": data_seed})
        run_dir = tmp_path / f"run-{protocol_seed}-{data_seed}"
        loop.train(tiny_model(), tiny_train(steps=2, seed=protocol_seed), data, run_dir)
        return torch.cat(served)

    base = batches(protocol_seed=0, data_seed=0)
    assert base.shape == (2 * 2 * 8, 32)  # 2 steps x 2 micro-steps x 8 windows
    assert torch.equal(batches(protocol_seed=1, data_seed=0), base)  # protocol.seed: the init only
    assert not torch.equal(batches(protocol_seed=0, data_seed=1), base)
