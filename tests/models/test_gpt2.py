"""GPT-2 baseline against transformers.GPT2LMHeadModel with the same weights (no download)."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from tests.models.tpb_oracle import randomize

transformers = pytest.importorskip("transformers")

VOCAB = 89


def gpt2_config(tied: bool) -> ModelConfig:
    return ModelConfig(arch="gpt2", vocab_size=VOCAB, hidden=48, n_layers=2, n_heads=4, n_kv_heads=4,
                       ffn_mult=4, tied=tied, max_seq_len=24)


def to_hf_gpt2(model):
    """Copy our weights into a GPT2LMHeadModel (its Conv1D weights are [in, out]: transpose)."""
    cfg = model.cfg
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.hidden, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_ffn, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tied,
    )).eval()
    state = {}
    for name, p in model.state_dict().items():
        theirs = "lm_head.weight" if name == "head.weight" else "transformer." + name
        theirs = theirs.replace(".ln1.", ".ln_1.").replace(".ln2.", ".ln_2.")
        conv = any(k in name for k in ("c_attn", "c_proj", "c_fc")) and name.endswith("weight")
        state[theirs] = p.T if conv else p
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("tied", [True, False])
def test_same_logits_as_transformers_gpt2(tied):
    torch.manual_seed(0)
    model = build_model(gpt2_config(tied))
    randomize(model)
    idx = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours, theirs = model(idx), to_hf_gpt2(model)(idx).logits
    assert ours.abs().max() > 0.1
    # fp32 rounding only: 3e-7 here alone; once 1.1e-5 (at |logit| 1.4) late in a full CI run on a loaded
    # machine. Any architectural difference (activation, norm, position, head) is orders of magnitude larger.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_tied_head_is_the_token_embedding():
    tied, untied = build_model(gpt2_config(True)), build_model(gpt2_config(False))
    assert tied.head.weight is tied.wte.weight
    assert untied.head.weight is not untied.wte.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) - n_tied == VOCAB * 48


def test_positions_matter_and_are_bounded():
    torch.manual_seed(0)
    model = build_model(gpt2_config(True))
    idx = torch.full((1, 6), 3)  # the same token everywhere: only positions tell them apart
    with torch.no_grad():
        logits = model(idx)
    assert (logits[0, 1] - logits[0, 4]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="sequence length 25 exceeds max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
