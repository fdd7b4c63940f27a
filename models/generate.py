"""Autoregressive generation over a preallocated (static) KV cache, for every model of models/.

A model that decodes incrementally offers two things (Llama, GPT2 and TPB do):

    cache = model.new_cache(batch, max_len)        # one KVCache per attention layer, allocated once
    logits = model(idx, cache=cache, pos=p)        # idx [B, T] at positions p .. p + T - 1 -> [B, T, V]

`generate` prefills the prompt in one call, then runs one token per step: the loop allocates
no cache, grows no tensor and runs under torch.inference_mode. The cache also holds a snapshot of
the dense layers' weights and the LM head in the decode layout ([in, out], q/k/v and gate/up fused;
models.layers.DecoderLayer.decode_weights): on CPU that matrix-vector product is 1.5-2x F.linear's. Every model binds it as a method,
`model.generate(idx, max_new_tokens, temperature, top_k, seed)`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
           ) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens (all when None)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@contextmanager
def eval_mode(model):
    """model.eval() inside (no dropout while sampling), the model's previous train / eval mode back after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


@torch.inference_mode()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    """idx [B, T0] (prompt token ids) -> [B, T0 + max_new_tokens]: the prompt then the sampled tokens.

    temperature 0 is greedy decoding; `seed` fixes the draws (a generator of its own, the global RNG
    untouched). The model runs in eval mode (no dropout), then gets its own mode back. The prompt and the
    new tokens must fit in cfg.max_seq_len.
    """
    if temperature < 0 or max_new_tokens < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"temperature={temperature}, max_new_tokens={max_new_tokens}, top_k={top_k}: "
                         "need temperature >= 0, max_new_tokens >= 0, top_k >= 1 or None")
    B, T0 = idx.shape
    total = T0 + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt {T0} + max_new_tokens {max_new_tokens} exceeds max_seq_len={model.cfg.max_seq_len}")
    generator = None
    if seed is not None:
        generator = torch.Generator(idx.device).manual_seed(seed)
    out = torch.empty(B, total, dtype=torch.long, device=idx.device)
    out[:, :T0] = idx
    if max_new_tokens == 0:
        return out
    cache = model.new_cache(B, total)
    with eval_mode(model):
        logits = model(idx, cache=cache, pos=0)[:, -1]  # prefill: [B, V] of the last prompt position
        for t in range(T0, total):
            out[:, t] = sample(logits, temperature, top_k, generator)
            if t + 1 < total:
                logits = model(out[:, t : t + 1], cache=cache, pos=t)[:, -1]  # one token: [B, V]
    return out
