"""Cross-entropy against soft targets, computed in cache-sized row chunks without fp32 copies of the logits.

``-sum_k t_k log_softmax(l / T)_k`` for each row. For iBOT the rows are the masked patch tokens (~600 per
ViT-S/14 batch of 8) and the columns the prototypes (65,536): the plain expression keeps an fp32 upcast and
an fp32 ``log_softmax`` of that [M, K] matrix alive until the backward (~0.3 GB there), and each of its
~8 element-wise passes streams the whole matrix through memory (on a CPU, a freshly allocated 160 MB
temporary also page-faults on first touch: measured 19 ms for one division that takes 0.8 ms on a
2 MB block that stays in cache).

Here the forward works through a few rows at a time in one reused fp32 buffer (``dinolab.utils.cpu_tuning``),
so every pass over a chunk stays in the CPU's cache, and keeps only the logits (in their own
dtype), the targets and two numbers per row (the log-sum-exp and the target mass). The backward
rebuilds the softmax of each chunk from the saved log-sum-exp. Values and gradients equal the plain fp32
expression.
"""

from __future__ import annotations

import torch

from dinolab.utils.cpu_tuning import block_rows


class _SoftTargetCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temp: float, chunk: int) -> torch.Tensor:
        n_rows = logits.shape[0]
        out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)  # log-sum-exp of each row of logits / temp
        mass = torch.empty_like(out)  # sum of each target row (1 for distributions)
        buf = torch.empty(min(chunk, n_rows), logits.shape[1], dtype=torch.float32, device=logits.device)
        prod = torch.empty_like(buf)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            s, p = buf[: end - start], prod[: end - start]
            t = targets[start:end].float()
            s.copy_(logits[start:end]).div_(temp)  # scaled logits, fp32
            torch.mul(s, t, out=p)
            dot = p.sum(-1)  # sum_k t_k s_k
            row_max = s.amax(-1, keepdim=True)
            lse_chunk = s.sub_(row_max).exp_().sum(-1).log_().add_(row_max.squeeze(-1))
            mass_chunk = t.sum(-1)
            lse[start:end], mass[start:end] = lse_chunk, mass_chunk
            out[start:end] = lse_chunk * mass_chunk - dot
        ctx.save_for_backward(logits, targets, lse, mass)
        ctx.temp, ctx.chunk = temp, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse, mass = ctx.saved_tensors
        n_rows = logits.shape[0]
        grad = torch.empty_like(logits)
        buf = torch.empty(min(ctx.chunk, n_rows), logits.shape[1], dtype=torch.float32, device=logits.device)
        scale = grad_out.float() / ctx.temp
        for start in range(0, n_rows, ctx.chunk):
            end = min(start + ctx.chunk, n_rows)
            p = buf[: end - start]
            # softmax(l / T) from the saved log-sum-exp, then d/dl [-sum t log softmax(l/T)] = (p sum(t) - t) / T
            p.copy_(logits[start:end]).div_(ctx.temp).sub_(lse[start:end, None]).exp_()
            p.mul_(mass[start:end, None]).sub_(targets[start:end]).mul_(scale[start:end, None])
            grad[start:end] = p
        return grad, None, None, None


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temp: float = 1.0, chunk_rows: int | None = None
) -> torch.Tensor:
    """Per-row ``-sum_k targets[n, k] * log_softmax(logits[n] / temp)[k]``, in fp32.

    Args:
        logits: [N, K] any float dtype (bf16 under autocast); gradients flow into it, in its dtype.
        targets: [N, K] target distributions (no gradient).
        temp: temperature dividing the logits (the student's, 0.1).
        chunk_rows: rows processed at a time (default: ``dinolab.utils.cpu_tuning.block_rows(K)``).

    Returns:
        [N] fp32 cross-entropies.
    """
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"soft_cross_entropy expects logits and targets [N,K] of equal shape, got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if chunk_rows is None:
        chunk_rows = block_rows(logits.shape[1])
    if chunk_rows < 1:
        raise ValueError(f"soft_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    return _SoftTargetCrossEntropy.apply(logits, targets.detach(), float(temp), int(chunk_rows))
