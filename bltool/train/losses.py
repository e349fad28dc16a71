"""The distillation loss of docs/method.md §4, computed over sequence chunks.

Over the non-padding next-token positions (position t predicts token t+1, right padding):

    L = α_kd · T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)) + (1 − α_kd) · CE(z_S, labels)

KL is summed over the vocabulary and both terms are averaged per predicted token; the T² keeps the
soft term's gradient on the scale of the hard term's as T grows (Hinton et al. 2015).

Memory: as in `nll.token_nll`, the LM heads are applied `chunk` positions at a time to the final hidden
states, so neither model's (B, T, V) float32 logits ever exist; one chunk's (B, c, V) do. With
`checkpoint=True` (the default) each chunk's heads and loss run under activation checkpointing, so the
backward pass also holds only the (B, T, d) hidden states plus one chunk's (B, c, V) intermediates
(recomputed, teacher head included: one extra pass of both heads). With `checkpoint=False` the backward
keeps three (B, c, V) float32 tensors per chunk (the student's two log-softmaxes and the teacher's
probabilities), which grows with T like the unchunked loss. benchmarks/kd_loss_memory.py measures both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from bltool.errors import UsageError

IGNORE_INDEX = -100  # label of a position with no target (padding), as in F.cross_entropy

Head = Callable[[torch.Tensor], torch.Tensor]  # (B, c, d) hidden → (B, c, V) logits, e.g. the LM head


class KDLoss(NamedTuple):
    """The loss to backpropagate and its two parts for logging (detached, 0-dim, float32)."""

    loss: torch.Tensor  # α_kd · T² · kl + (1 − α_kd) · ce
    kl: torch.Tensor  # mean KL(teacher ‖ student) per token at temperature T, without the T²
    ce: torch.Tensor  # mean cross-entropy of the student against the labels, at temperature 1


def check_kd_args(temperature: float, kd_weight: float, chunk: int = 1) -> None:
    """Raise UsageError, naming the CLI flag, for a temperature, KD weight or chunk out of range."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be a positive number, got {temperature}")
    if not 0.0 <= kd_weight <= 1.0:  # also rejects NaN
        raise UsageError(f"--kd-weight must be in [0, 1], got {kd_weight}")
    if chunk < 1:
        raise UsageError(f"--chunk must be at least 1, got {chunk}")


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels (B, T-1) for positions 0..T-2: the next token, or IGNORE_INDEX where it is padding."""
    return input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (bf16/fp16 are upcast; float64, used by tests, is kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl_ce_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """[Σ KL, Σ CE] over the positions whose label is not IGNORE_INDEX; logits (..., V), labels (...)."""
    valid = labels != IGNORE_INDEX  # (...)
    with torch.no_grad():
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)  # (..., V)
        p_t = log_p_t.exp()
        neg_entropy_t = (p_t * log_p_t).sum(-1)  # (...) Σ_v p_T log p_T
        del log_p_t
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)  # (..., V), saved for the backward
    kl = neg_entropy_t - (p_t * log_p_s).sum(-1)  # (...) Σ_v p_T (log p_T − log p_S)
    kl = torch.where(valid, kl, 0.0).sum()
    ce = F.cross_entropy(student_logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    return torch.stack([kl, ce])


def _combine(sums: torch.Tensor, n_valid: torch.Tensor, temperature: float, kd_weight: float,
             normalizer: float | None = None) -> KDLoss:
    """Sums → the loss. Divided by this batch's predicted tokens, or by `normalizer`: a training step
    passes the count over all of its micro-batches and processes, so that the gradients it accumulates
    are those of the mean over the step's tokens (docs/method.md §4), however they are split."""
    kl, ce = sums / (n_valid.clamp(min=1) if normalizer is None else max(normalizer, 1e-12))
    loss = kd_weight * temperature**2 * kl + (1.0 - kd_weight) * ce
    return KDLoss(loss, kl.detach().float(), ce.detach().float())


def _chunked_sums(student_hidden: torch.Tensor, labels: torch.Tensor, chunk: int, checkpoint: bool,
                  chunk_sums: Callable[..., torch.Tensor], *teacher: torch.Tensor) -> torch.Tensor:
    """Σ over chunks of `chunk_sums(h_s, labels, *teacher)` ([Σ KL, Σ CE]), position chunks of `chunk`.

    `teacher` tensors are sliced along dim 1 like the student's hidden states. With right padding the
    tail is padding in every row, so the loop stops after the last column with a target (one host sync).
    """
    valid = labels != IGNORE_INDEX
    span = int(valid.any(0).nonzero().max()) + 1 if bool(valid.any()) else 0
    # the zero term keeps the loss on the student's graph even for an all-padding batch
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    sums = student_hidden[:, :0].sum().to(dtype) * torch.zeros(2, dtype=dtype, device=student_hidden.device)
    for start in range(0, span, chunk):
        stop = min(start + chunk, span)
        args = (student_hidden[:, start:stop], labels[:, start:stop], *(t[:, start:stop] for t in teacher))
        if checkpoint and torch.is_grad_enabled():
            # Saves only the inputs; the backward recomputes this chunk's logits, then frees them.
            sums = sums + _checkpoint(chunk_sums, *args, use_reentrant=False)
        else:
            sums = sums + chunk_sums(*args)
    return sums


def kd_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: Head, teacher_head: Head,
            input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 3.0,
            kd_weight: float = 0.8, chunk: int = 256, checkpoint: bool = True,
            normalizer: float | None = None) -> KDLoss:
    """The §4 loss from both models' final hidden states (B, T, d_S) and (B, T, d_T), chunk by chunk.

    Hidden states come from `nll.hidden_states`; the heads are the models' `get_output_embeddings()`.
    Gradients reach the student's hidden states and head only: the teacher's side runs under no_grad.
    `normalizer`: divide the sums by this instead of the batch's predicted-token count (see `_combine`).
    """
    check_kd_args(temperature, kd_weight, chunk)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)

    def chunk_sums(h_s: torch.Tensor, y: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        z_s = _fp32(student_head(h_s))  # (B, c, V) float32
        with torch.no_grad():
            z_t = _fp32(teacher_head(h_t))  # (B, c, V) float32, no graph
        return _kl_ce_sums(z_s, z_t, y, temperature)  # (2,)

    sums = _chunked_sums(student_hidden, labels, chunk, checkpoint, chunk_sums, teacher_hidden.detach())
    return _combine(sums, (labels != IGNORE_INDEX).sum(), temperature, kd_weight, normalizer)


def _topk_kl_ce_sums(student_logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                     topk_logits: torch.Tensor, teacher_lse: torch.Tensor, teacher_log_tail: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """[Σ KL, Σ CE] against a teacher known by its top-k logits (..., k), the log-sum-exp (...) of its
    logits at `temperature` (both shifted by the same constant: only log p = logit / T − lse matters), and
    the log of its mass beyond the top k (...): the KL between both distributions coarse-grained to
    k + 1 outcomes (the teacher's k tokens, and one bucket for everything else)."""
    valid = labels != IGNORE_INDEX
    lowest = torch.finfo(student_logits.dtype).min
    with torch.no_grad():
        log_p = _fp32(topk_logits) / temperature - _fp32(teacher_lse).unsqueeze(-1)  # (..., k)
        p = log_p.exp()
        log_p_tail = _fp32(teacher_log_tail).clamp(min=lowest)  # (...) exact to float32 (the cache's)
        p_tail = log_p_tail.exp()  # 0 when k = V
    z = student_logits / temperature  # (..., V)
    ids = topk_ids.long()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (..., 1)
    log_q = z.gather(-1, ids) - lse  # (..., k)
    # the student's tail: a log-sum-exp over its logits with the teacher's top k masked out (exact, and
    # with a gradient however little mass the student leaves there)
    log_q_tail = (torch.logsumexp(z.scatter(-1, ids, lowest), dim=-1, keepdim=True) - lse).squeeze(-1)  # (...)
    kl = (p * (log_p - log_q)).sum(-1) + p_tail * (log_p_tail - log_q_tail)
    kl = torch.where(valid, kl, 0.0).sum()
    ce = F.cross_entropy(student_logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    return torch.stack([kl, ce])


def kd_loss_topk(student_hidden: torch.Tensor, student_head: Head, topk_ids: torch.Tensor,
                 topk_logits: torch.Tensor, teacher_lse: torch.Tensor, teacher_log_tail: torch.Tensor,
                 input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 3.0,
                 kd_weight: float = 0.8, chunk: int = 256, checkpoint: bool = True,
                 normalizer: float | None = None) -> KDLoss:
    """The §4 loss with a cached teacher (`bltool teacher-logits`, `teacher_cache.teacher_topk`):
    `topk_ids` / `topk_logits` (B, T-1, k) are the teacher's k largest logits at each predicting position,
    `teacher_lse` (B, T-1) the log-sum-exp of all its logits divided by `temperature` (both may be shifted
    by one constant per position), `teacher_log_tail` (B, T-1) the log of its probability mass beyond the
    top k at `temperature` (the temperature the cache was made at).

    How the tail is treated: the teacher's mass beyond its top k is one bucket. The KL term compares the
    teacher's k probabilities and that bucket's total with the student's probabilities of the same k
    tokens and the student's remaining mass, so the student is pushed to put the right total mass on
    the tail but not told how to spread it. This is the exact KL between the two distributions
    coarse-grained to k + 1 outcomes, a lower bound on the full KL that reaches it when k = V. The CE
    term is unchanged (it needs no teacher).
    """
    check_kd_args(temperature, kd_weight, chunk)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)

    def chunk_sums(h_s: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor,
                   lse: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        z_s = _fp32(student_head(h_s))  # (B, c, V) float32
        return _topk_kl_ce_sums(z_s, y, ids, logits, lse, tail, temperature)  # (2,)

    sums = _chunked_sums(student_hidden, labels, chunk, checkpoint, chunk_sums, topk_ids, topk_logits, teacher_lse,
                         teacher_log_tail)
    return _combine(sums, (labels != IGNORE_INDEX).sum(), temperature, kd_weight, normalizer)


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, temperature: float = 3.0, kd_weight: float = 0.8) -> KDLoss:
    """The same loss from full logits (B, T, V) of both models, unchunked: for tests and comparisons."""
    check_kd_args(temperature, kd_weight)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)
    valid = labels != IGNORE_INDEX
    z_s = _fp32(student_logits[:, :-1][valid])  # (N, V) the N predicted positions
    z_t = _fp32(teacher_logits[:, :-1][valid].detach())  # (N, V)
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
    ce = F.cross_entropy(z_s, labels[valid], reduction="sum")
    return _combine(torch.stack([kl, ce]), valid.sum(), temperature, kd_weight)
