"""Model FLOP utilization: the FLOPs a training step needs, counted from the model's shapes, over the matmul
peak of this machine measured on the same threads.

Counting (the convention of Kaplan et al. 2020 and PaLM's MFU, extended to frozen weights): a weight matrix
of N parameters costs 2N FLOPs per token forward; backward, the gradient with respect to its input costs
another 2N wherever a gradient must pass through it (every layer above the lowest trained one: with LoRA,
all of them), and the gradient with respect to the weight 2N more only where the weight is trained. So a
frozen matrix costs 4N per token, a trained one 6N (LoRA's A and B are trained matrices of their own).
Attention's two matmuls (scores QK^T and their product with V) cost 2 x 2 x seq x d_attn per token and layer
forward, half of that under a causal mask, and twice as much again backward. The LM head counts only on the
positions a loss reads (the rest of its work is waste, whether or not a stage does it). Embedding lookups,
norms, activations and the softmax are not matmuls and are left out, as MFU conventions do.
"""

from __future__ import annotations

import time

import torch


def linear_parameters(model) -> tuple[int, int, int]:
    """(frozen, trained, head) parameters of the model's weight matrices: every 2-D parameter (linear layers,
    GPT-2's ``Conv1D``, LoRA's A and B) except embedding tables and the LM head, whose size is the third
    figure (tied or not). Each parameter counts once, however many modules hold it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    frozen = trained = head_params = 0
    for p in model.parameters():
        if p is head_weight:
            head_params = p.numel()
        elif p.dim() == 2 and id(p) not in tables:
            if p.requires_grad:
                trained += p.numel()
            else:
                frozen += p.numel()
    return frozen, trained, head_params


def training_flops(model, tokens: int, loss_tokens: int, seq_len: int) -> float:
    """FLOPs of one training step over ``tokens`` positions (sequences of ``seq_len``), of which ``loss_tokens``
    are read by the loss (see the module docstring)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    frozen, trained, head = linear_parameters(inner)
    heads = config.num_attention_heads
    d_attn = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    attention_forward = 2 * 2 * seq_len * d_attn * config.num_hidden_layers / 2   # causal: half the scores
    per_token = 4 * frozen + 6 * trained + 3 * attention_forward
    head_trained = inner.get_output_embeddings().weight.requires_grad
    return tokens * per_token + loss_tokens * (6 if head_trained else 4) * head


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` fp32 (size x size) @ (size x size) matmuls on the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up the kernels and the allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best
