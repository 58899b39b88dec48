"""Cross-entropy against soft targets, computed in row chunks without fp32 copies of the logits.

``-sum_k t_k log_softmax(l / T)_k`` for each row. For iBOT the rows are the masked patch tokens (~1,000 per
ViT-S/14 batch of 8) and the columns the prototypes (65,536): the plain expression keeps an fp32 upcast and
an fp32 ``log_softmax`` of that [M, K] matrix alive until the backward (~0.5 GB there). Here the forward
works one chunk at a time and keeps only the logits (in their own dtype) and the targets; the backward
recomputes the softmax chunk by chunk. Values and gradients equal the plain fp32 expression.
"""

from __future__ import annotations

import torch

# rows per chunk: 256 x 65,536 fp32 = 64 MB of temporaries at a time
DEFAULT_CHUNK_ROWS = 256


class _SoftTargetCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temp: float, chunk: int) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            scaled = logits[start : start + chunk].float() / temp
            t = targets[start : start + chunk].float()
            out[start : start + chunk] = torch.logsumexp(scaled, dim=-1) * t.sum(-1) - (t * scaled).sum(-1)
        ctx.save_for_backward(logits, targets)
        ctx.temp, ctx.chunk = temp, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            end = start + ctx.chunk
            p = torch.softmax(logits[start:end].float() / ctx.temp, dim=-1)
            t = targets[start:end].float()
            # d/dl [-sum t log softmax(l/T)] = (softmax(l/T) * sum(t) - t) / T
            g = (p * t.sum(-1, keepdim=True) - t) * (grad_out[start:end, None].float() / ctx.temp)
            grad[start:end] = g.to(grad.dtype)
        return grad, None, None, None


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temp: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """Per-row ``-sum_k targets[n, k] * log_softmax(logits[n] / temp)[k]``, in fp32.

    Args:
        logits: [N, K] any float dtype (bf16 under autocast); gradients flow into it, in its dtype.
        targets: [N, K] target distributions (no gradient).
        temp: temperature dividing the logits (the student's, 0.1).
        chunk_rows: rows processed at a time.

    Returns:
        [N] fp32 cross-entropies.
    """
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"soft_cross_entropy expects logits and targets [N,K] of equal shape, got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if chunk_rows < 1:
        raise ValueError(f"soft_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    return _SoftTargetCrossEntropy.apply(logits, targets.detach(), float(temp), int(chunk_rows))
