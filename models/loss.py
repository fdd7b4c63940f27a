"""Language-model loss fused with the output projection: mean cross-entropy of softmax(x W^T) against
targets, computed a chunk of rows at a time, gradients included.

Why: the plain path (logits = head(x); F.cross_entropy(logits.float(), y)) materialises [N, V]
logits, an fp32 copy of them, their log-softmax and, in backward, a zero-filled one-hot gradient
and its casts: six or more full passes over N x V floats, which on a CPU cost as much as the head's
matmuls and at vocabulary 32k-50k dominate peak memory. Here each chunk of rows computes its logits
(in the autocast dtype if autocast is on), their fp32 log-softmax, the loss and the gradient of the
logits (softmax - one-hot) / N while the chunk is still in cache, then the gradients of x and W;
backward only scales the stored gradients. Peak extra memory is one chunk of logits.

The result equals F.cross_entropy(F.linear(x, weight).float(), targets) (tests/models/test_loss.py).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22
"""Logits per chunk (rows x vocabulary): 16 MiB in fp32 (fastest of 1-32 MiB measured at vocabulary 8192 on a 2-core CPU)."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _chunks(n_rows: int, vocab: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def _loss_and_grads(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_x: bool, need_w: bool):
    """x [N, D], weight [V, D], targets [N] -> (mean loss, d loss / dx or None, d loss / dW or None).

    The chunk buffers (logits, their fp32 log-softmax, the gradient of the logits) are allocated once
    per call and reused by every chunk through out= ops: a fresh 16 MiB tensor per op and chunk costs
    page faults that, in bf16, took longer than the casts themselves (19% of a training step)."""
    dtype = _compute_dtype(x)
    acc = torch.promote_types(dtype, torch.float32)  # softmax and loss in fp32 (fp64 stays fp64)
    with torch.autocast(x.device.type, enabled=False):
        w = weight.to(dtype)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = torch.zeros((), dtype=acc, device=x.device)
        n, V = x.shape[0], weight.shape[0]
        chunks = _chunks(n, V)
        rows_max = chunks[0].stop - chunks[0].start
        logits = torch.empty(rows_max, V, dtype=dtype, device=x.device)
        logp = torch.empty(rows_max, V, dtype=acc, device=x.device)
        wide = torch.empty(rows_max, V, dtype=acc, device=x.device) if dtype != acc else logits
        grad = torch.empty(rows_max, V, dtype=dtype, device=x.device) if dtype != acc else logp
        for rows in chunks:
            c = rows.stop - rows.start
            xc, yc = x[rows].to(dtype), targets[rows, None]
            torch.mm(xc, w.T, out=logits[:c])  # [c, V]
            if dtype != acc:
                wide[:c].copy_(logits[:c])
            torch.log_softmax(wide[:c], dim=-1, out=logp[:c])
            total -= logp[:c].gather(1, yc).sum()
            if need_x or need_w:
                g = logp[:c].exp_()  # softmax, in place
                g.scatter_add_(1, yc, torch.full_like(g[:, :1], -1.0))
                gc = torch.div(g, n, out=grad[:c])  # d loss / d logits, cast to the compute dtype in the same pass
                if need_x and grad_x.dtype == dtype:
                    torch.mm(gc, w, out=grad_x[rows])
                elif need_x:
                    grad_x[rows] = gc @ w
                if need_w:
                    if dtype == acc:
                        grad_w.addmm_(gc.T, xc)
                    else:
                        grad_w += gc.T @ xc
    return total / n, grad_x, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, grad_x, grad_w = _loss_and_grads(x, weight, targets, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(grad_x), scale(grad_w), None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits x @ weight^T against targets: x [..., D], weight [V, D], targets [...] of
    token ids -> fp32 scalar. Every target must be a valid id (no ignore index)."""
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match x {tuple(x.shape[:-1])}")
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        with torch.no_grad():  # evaluation: the loss only
            return _loss_and_grads(x, weight, targets, need_x=False, need_w=False)[0]
    return _LinearCrossEntropy.apply(x, weight, targets)


def lm_output(x: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor | None) -> torch.Tensor:
    """A model's last step: logits head(x) [B, T, V], or with targets the fused loss (the training path)."""
    return head(x) if targets is None else linear_cross_entropy(x, head.weight, targets)
