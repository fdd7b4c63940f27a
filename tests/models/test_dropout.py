"""Dropout (ModelConfig.dropout) in every architecture: off at 0, on in train mode only, seeded by torch's
global generator, ignored in eval mode and by generate()."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import ModelConfig, build_model

VOCAB = 61
CONFIGS = {
    "llama": dict(arch="llama", hidden=32, n_layers=2, n_heads=4, n_kv_heads=2),
    "gpt2": dict(arch="gpt2", hidden=32, n_layers=2, n_heads=4),
    "sandwich, lanes only": dict(arch="tpb", hidden=32, lane_count=2, lane_depth=2, lane_heads=2, n_classic_layers=0),
    "burger, comm, classic": dict(arch="tpb", recipe="burger", hidden=32, lane_count=4, lane_depth=3, lane_heads=2,
                                  n_heads=2, n_kv_heads=2, comm=True),
}
ARCHS = pytest.mark.parametrize("fields", list(CONFIGS.values()), ids=list(CONFIGS))


def pair(fields: dict, p: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights without and with dropout p (both built from seed 0: dropout draws nothing at init)."""
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=16, **fields)
    torch.manual_seed(0)
    off = build_model(cfg)
    torch.manual_seed(0)
    on = build_model(dataclasses.replace(cfg, dropout=p))
    return off, on


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, T]


def loss_and_grads(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@ARCHS
def test_dropout_changes_neither_the_weights_nor_the_parameter_count(fields):
    off, on = pair(fields, 0.5)
    assert sum(p.numel() for p in on.parameters()) == sum(p.numel() for p in off.parameters())
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), on.state_dict().values(), strict=True))


@ARCHS
def test_dropout_zero_in_train_mode_is_the_eval_computation_and_draws_nothing(fields):
    model, _ = pair(fields, 0.1)
    idx = tokens()
    model.eval()
    with torch.no_grad():
        expected = model(idx)
    model.train()
    state = torch.get_rng_state()
    logits = model(idx)
    loss_and_grads(model, idx)
    assert torch.equal(torch.get_rng_state(), state)  # no mask drawn: a dropout-free run's RNG stream
    assert torch.equal(logits, expected)


@ARCHS
def test_dropout_in_train_mode_changes_the_output_and_is_fixed_by_the_seed(fields):
    off, on = pair(fields, 0.2)
    idx = tokens()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(loss_and_grads(on, idx))
    (loss, grads), (again, grads_again), (other, _) = runs
    assert torch.equal(loss, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))
    reference, _ = loss_and_grads(off, idx)
    assert loss != other and loss != reference and again != reference


@ARCHS
def test_eval_mode_ignores_dropout_and_draws_nothing(fields):
    off, on = pair(fields, 0.5)
    idx = tokens()
    off.eval(), on.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(on(idx), off(idx))
        assert torch.equal(on(idx[:, :-1], idx[:, 1:]), off(idx[:, :-1], idx[:, 1:]))
    assert torch.equal(torch.get_rng_state(), state)


@ARCHS
def test_generate_runs_in_eval_mode_and_gives_the_model_its_mode_back(fields):
    off, on = pair(fields, 0.5)
    prompt = tokens()[:, :4]
    state = torch.get_rng_state()
    sampled = on.generate(prompt, 6, temperature=1.0, seed=3)  # on is in train mode
    assert on.training and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(sampled, off.eval().generate(prompt, 6, temperature=1.0, seed=3))
    assert not off.training
