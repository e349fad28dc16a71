"""The distillation loss of docs/method.md §4, fused with the student's LM head.

`kd_loss` (a live teacher), `kd_loss_topk` and `kd_loss_sampled` (a `teacher-logits` cache; their gradients
are derived there) make one pass over the positions, `chunk` tokens at a time (rows × positions: ⌊chunk / B⌋
positions of every row, at least one), computing the loss and its closed-form gradient with respect to the
logits, then the gradients with respect to the hidden states and, when the head trains, the head's weight
and bias, which a small autograd Function hands back in the backward pass. So neither model's (B, T, V)
logits ever exist, only one chunk's, and each head runs once per position (an autograd graph through the
heads would keep every chunk's intermediates, and activation checkpointing would run both heads twice): the
approach of Liger-Kernel's fused linear cross-entropy and distillation losses. Padded positions get weight 0,
without a host sync. `kd_loss_reference`, `kd_loss_topk_reference` and `kd_loss_sampled_reference` are the
plain autograd forms from full logits, for tests and comparisons.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from bltool.adapt.kernels import linear
from bltool.checks import check_kd

IGNORE_INDEX = -100  # label of a position with no target (padding), as in F.cross_entropy


class KDLoss(NamedTuple):
    """The loss to backpropagate and its two parts for logging (detached, 0-dim, float32)."""

    loss: torch.Tensor  # α_kd · T² · kl + (1 − α_kd) · ce
    kl: torch.Tensor  # mean KL(teacher ‖ student) per token at temperature T, without the T²
    ce: torch.Tensor  # mean cross-entropy of the student against the labels, at temperature 1


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels (B, T-1) for positions 0..T-2: the next token, or IGNORE_INDEX where it is padding."""
    return input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (bf16/fp16 are upcast; float64, used by tests, is kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------------
# The fused pass


class _WithGradients(torch.autograd.Function):
    """Returns `loss` (computed without a graph) and, in the backward, the gradients computed with it."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias)]
        return None, scaled[0], scaled[1], scaled[2], None, None, None


class _Head(NamedTuple):
    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None  # (V,)

    @classmethod
    def of(cls, module: torch.nn.Module) -> _Head:
        """The weight and bias of an LM head (a `get_output_embeddings()` linear layer)."""
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(f"the fused KD loss needs a linear LM head, got {type(module).__name__}")
        return cls(module.weight, module.bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return _fp32(linear(h, self.weight.detach(), None if self.bias is None else self.bias.detach()))


def chunk_positions(chunk: int, rows: int) -> int:
    """Positions per chunk when `chunk` counts tokens over `rows` rows (`--chunk`): at least one."""
    return max(1, chunk // rows)


def _fused(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int, temperature: float,
           kd_weight: float, normalizer: float | None, chunk_terms, teacher: tuple[torch.Tensor, ...]) -> KDLoss:
    """The chunked pass shared by both forms. `chunk_terms(z, *teacher_chunk)` gets one chunk's student
    logits z (n, V) (float32 or wider; it may overwrite them) and the teacher's side for those positions,
    and returns the per-position KL (n,) and its gradient with respect to z/T (n, V); the CE is done here.
    Teacher tensors (B, T-1, ...) are sliced like the positions."""
    w = _Head.of(head)
    b, t = labels.shape
    valid = labels != IGNORE_INDEX  # (B, T-1)
    device, acc = hidden.device, torch.promote_types(hidden.dtype, torch.float32)
    denominator = (valid.sum().clamp(min=1) if normalizer is None else
                   torch.tensor(max(normalizer, 1e-12), device=device)).to(acc)
    needs = (hidden.requires_grad, w.weight.requires_grad, w.bias is not None and w.bias.requires_grad)
    want_grad = torch.is_grad_enabled() and any(needs)
    grad_hidden = torch.zeros_like(hidden) if want_grad and needs[0] else None
    grad_weight = torch.zeros(w.weight.shape, dtype=acc, device=device) if want_grad and needs[1] else None
    grad_bias = torch.zeros(w.bias.shape, dtype=acc, device=device) if want_grad and needs[2] else None
    kl_scale = kd_weight * temperature / denominator  # ∂L/∂(z/T) per unit of ∂KL/∂(z/T), times T for ∂z
    ce_scale = (1.0 - kd_weight) / denominator
    sums = torch.zeros(2, dtype=acc, device=device)  # Σ KL, Σ CE over the valid positions
    positions = chunk_positions(chunk, b)  # `chunk` tokens over the batch's rows: the (n, V) buffers' size
    with torch.no_grad():
        for start in range(0, t, positions):
            stop = min(start + positions, t)
            h = hidden[:, start:stop].detach().reshape(-1, hidden.shape[-1])  # (n, d)
            y = labels[:, start:stop].reshape(-1, 1).clamp(min=0)  # (n, 1); padding reads token 0
            ok = valid[:, start:stop].reshape(-1)  # (n,)
            z = w.logits(h)  # (n, V)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1) at temperature 1, for the CE
            ce = (lse - z.gather(-1, y)).squeeze(-1)
            p_ce = (z - lse).exp_() if want_grad and kd_weight < 1 else None  # softmax(z)
            kl, g = chunk_terms(z, *(x[:, start:stop].flatten(0, 1) for x in teacher))  # z is overwritten
            sums += torch.stack([torch.where(ok, kl, 0.0).sum(), torch.where(ok, ce, 0.0).sum()]).to(acc)
            if not want_grad:
                continue
            g = g.mul_(kl_scale.to(g.dtype))
            if p_ce is not None:  # + (1 − α)/N · (softmax(z) − onehot)
                g.add_(p_ce.mul_(ce_scale.to(g.dtype)))
                g.scatter_add_(-1, y, (-ce_scale).to(g.dtype).expand(len(y), 1))
            g.masked_fill_(~ok.unsqueeze(-1), 0.0)  # padding: no gradient (and no NaN from its garbage)
            if grad_hidden is not None:
                # g · W, as a linear with W as a (d, V) view (oneDNN on the CPU; bltool.adapt.kernels)
                grad_hidden[:, start:stop] = linear(g.to(w.weight.dtype), w.weight.detach().t()).view(
                    b, stop - start, -1)
            if grad_weight is not None:
                torch.addmm(grad_weight, g.t(), h.to(acc), out=grad_weight)
            if grad_bias is not None:
                grad_bias += g.sum(0)
    kl_mean, ce_mean = sums / denominator
    loss = kd_weight * temperature**2 * kl_mean + (1.0 - kd_weight) * ce_mean
    if want_grad:
        loss = _WithGradients.apply(
            loss, hidden, w.weight, w.bias, grad_hidden,
            None if grad_weight is None else grad_weight.to(w.weight.dtype),
            None if grad_bias is None else grad_bias.to(w.bias.dtype))
    return KDLoss(loss, kl_mean.detach().float(), ce_mean.detach().float())


def kd_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: torch.nn.Module,
            teacher_head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            temperature: float = 3.0, kd_weight: float = 0.8, chunk: int = 512,
            normalizer: float | None = None) -> KDLoss:
    """The §4 loss from both models' final hidden states (B, T, d_S) and (B, T, d_T) and their linear LM
    heads (`get_output_embeddings()`), fused with the heads, `chunk` tokens (rows × positions) at a time.

    Gradients reach the student's hidden states and head only. `normalizer`: divide the sums by this
    instead of the batch's predicted-token count (a training step passes the count over all of its
    micro-batches and processes, so that the gradients it accumulates are those of the mean over the
    step's tokens, docs/method.md §4, however they are split).

    Per position, with q = softmax(z_S/T) and p = softmax(z_T/T):
    KL = Σ p log p − Σ p · z_S/T + lse(z_S/T), and ∂KL/∂(z_S/T) = q − p.
    """
    check_kd(temperature, kd_weight, chunk)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)
    t_head = _Head.of(teacher_head)

    def chunk_terms(z: torch.Tensor, h_t: torch.Tensor):
        log_p = t_head.logits(h_t).div_(temperature)  # (n, V) z_T / T
        log_p = log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
        p = log_p.exp()
        neg_entropy = torch.linalg.vecdot(p, log_p)  # Σ p log p
        del log_p
        z = z.div_(temperature)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        kl = neg_entropy - torch.linalg.vecdot(p, z) + lse.squeeze(-1)
        return kl, z.sub_(lse).exp_().sub_(p)  # q − p

    return _fused(student_hidden, student_head, labels, chunk, temperature, kd_weight, normalizer, chunk_terms,
                  (teacher_hidden[:, :-1].detach(),))


def kd_loss_topk(student_hidden: torch.Tensor, student_head: torch.nn.Module, topk_ids: torch.Tensor,
                 topk_logits: torch.Tensor, teacher_lse: torch.Tensor, teacher_log_tail: torch.Tensor,
                 input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 3.0,
                 kd_weight: float = 0.8, chunk: int = 512, normalizer: float | None = None) -> KDLoss:
    """The §4 loss with a cached teacher (`bltool teacher-logits`, `teacher_cache.teacher_topk`), fused
    with the student's head like `kd_loss`: `topk_ids` / `topk_logits` (B, T-1, k) are the teacher's k
    largest logits at each predicting position, `teacher_lse` (B, T-1) the log-sum-exp of all its logits
    divided by `temperature` (both may be shifted by one constant per position), `teacher_log_tail`
    (B, T-1) the log of its probability mass beyond the top k at `temperature` (the temperature the cache
    was made at).

    How the tail is treated: the teacher's mass beyond its top k is one bucket. The KL term compares the
    teacher's k probabilities p_K and that bucket's total p_tail with the student's probabilities q_K of
    the same k tokens and the student's remaining mass Q_tail, so the student is pushed to put the right
    total mass on the tail but not told how to spread it. This is the exact KL between the two
    distributions coarse-grained to k + 1 outcomes, a lower bound on the full KL that reaches it when
    k = V. The CE term is unchanged (it needs no teacher). Its gradient with respect to z_S/T is q_j − p_j
    for a top-k token j and q_j − p_tail · q_j / Q_tail for any other (the student's tail, rescaled to
    the teacher's tail mass); q_j / Q_tail is computed as exp(z_j/T − lse over the tail), exact however
    little mass the student leaves there.
    """
    check_kd(temperature, kd_weight, chunk)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)

    def chunk_terms(z: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, lse_t: torch.Tensor,
                    log_tail: torch.Tensor):
        ids = ids.long()
        log_p = _fp32(logits) / temperature - _fp32(lse_t).unsqueeze(-1)  # (n, k)
        p = log_p.exp()
        log_p_tail = _fp32(log_tail)  # (n,) −inf at k = V
        p_tail = log_p_tail.exp()
        z = z.div_(temperature)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
        rest = z.scatter(-1, ids, float("-inf"))  # (n, V) the student's tail
        lse_rest = torch.logsumexp(rest, dim=-1, keepdim=True)  # (n, 1) −inf at k = V
        lse_rest = torch.where(torch.isfinite(lse_rest), lse_rest, 0.0)
        log_q = z.gather(-1, ids) - lse  # (n, k)
        tail_term = torch.where(p_tail > 0, p_tail * (log_p_tail - (lse_rest - lse).squeeze(-1)), 0.0)
        kl = torch.linalg.vecdot(p, log_p - log_q) + tail_term
        g = z.sub_(lse).exp_()  # q
        g.scatter_add_(-1, ids, -p)
        g.sub_(rest.sub_(lse_rest).exp_().mul_(p_tail.unsqueeze(-1)))  # the tail's q_j / Q_tail · p_tail
        return kl, g

    return _fused(student_hidden, student_head, labels, chunk, temperature, kd_weight, normalizer, chunk_terms,
                  (topk_ids, topk_logits, teacher_lse, teacher_log_tail))


def kd_loss_sampled(student_hidden: torch.Tensor, student_head: torch.nn.Module, sample_ids: torch.Tensor,
                    sample_counts: torch.Tensor, teacher_entropy: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, temperature: float = 3.0, kd_weight: float = 0.8,
                    chunk: int = 512, normalizer: float | None = None) -> KDLoss:
    """The §4 loss with a sampled teacher cache (`bltool teacher-logits --sample N`,
    `teacher_cache.teacher_sample_rows`), fused with the student's head like `kd_loss`: `sample_ids` /
    `sample_counts` (B, T-1, m) are the distinct token ids drawn from the teacher's softmax(z_T/T) at each
    predicting position and how often each was drawn (N draws in all; padding entries have count 0), and
    `teacher_entropy` (B, T-1) the teacher's entropy at T.

    The estimator (random-sampling KD, Anshumann et al., "Sparse Logit Sampling", ACL 2025, with the
    teacher's own distribution as the proposal, so every importance weight is 1): the teacher's
    distribution is replaced by the empirical one of its draws, p̂_j = count_j / N, whose expectation is
    p_j. The KL's gradient with respect to z_S/T is q − p̂, so its expectation over the draws is the full
    KD gradient q − p: unbiased, whatever the student. The loss's value, KL̂ = −H(p) − Σ_j p̂_j log q_j,
    is unbiased for the KL too (and can be negative at a position). The CE term needs no teacher.
    """
    check_kd(temperature, kd_weight, chunk)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)

    def chunk_terms(z: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, entropy: torch.Tensor):
        ids = ids.long()
        w = _fp32(counts)
        w = (w / w.sum(-1, keepdim=True).clamp(min=1)).to(z.dtype)  # p̂ (n, m), 0 on padding entries
        z = z.div_(temperature)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
        kl = -_fp32(entropy).to(z.dtype) - torch.linalg.vecdot(w, z.gather(-1, ids) - lse)
        g = z.sub_(lse).exp_()  # q
        return kl, g.scatter_add_(-1, ids, -w)  # q − p̂

    return _fused(student_hidden, student_head, labels, chunk, temperature, kd_weight, normalizer, chunk_terms,
                  (sample_ids, sample_counts, teacher_entropy))


# ---------------------------------------------------------------------------------------------------
# Plain autograd forms from full logits


def _combine(kl: torch.Tensor, ce: torch.Tensor, n: torch.Tensor, temperature: float, kd_weight: float) -> KDLoss:
    kl, ce = kl / n.clamp(min=1), ce / n.clamp(min=1)
    return KDLoss(kd_weight * temperature**2 * kl + (1.0 - kd_weight) * ce, kl.detach().float(), ce.detach().float())


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, temperature: float = 3.0, kd_weight: float = 0.8) -> KDLoss:
    """The same loss from full logits (B, T, V) of both models, unchunked, by autograd: for tests and
    comparisons."""
    check_kd(temperature, kd_weight)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)
    valid = labels != IGNORE_INDEX
    z_s = _fp32(student_logits[:, :-1][valid])  # (N, V) the N predicted positions
    z_t = _fp32(teacher_logits[:, :-1][valid].detach())  # (N, V)
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
    ce = F.cross_entropy(z_s, labels[valid], reduction="sum")
    return _combine(kl, ce, valid.sum(), temperature, kd_weight)


def kd_loss_topk_reference(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
                           teacher_lse: torch.Tensor, teacher_log_tail: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, temperature: float = 3.0,
                           kd_weight: float = 0.8) -> KDLoss:
    """`kd_loss_topk` from the student's full logits (B, T, V), unchunked, by autograd (tests)."""
    check_kd(temperature, kd_weight)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)
    valid = labels != IGNORE_INDEX
    z = _fp32(student_logits[:, :-1][valid]) / temperature  # (N, V)
    ids = topk_ids[valid].long()
    log_p = _fp32(topk_logits[valid]) / temperature - _fp32(teacher_lse[valid]).unsqueeze(-1)
    log_p_tail = _fp32(teacher_log_tail[valid])
    lse = torch.logsumexp(z, dim=-1)
    log_q = z.gather(-1, ids) - lse.unsqueeze(-1)
    log_q_tail = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1) - lse
    tail = torch.where(log_p_tail > float("-inf"), log_p_tail.exp() * (log_p_tail - log_q_tail), 0.0)
    kl = (log_p.exp() * (log_p - log_q)).sum() + tail.sum()
    ce = F.cross_entropy(z * temperature, labels[valid], reduction="sum")
    return _combine(kl, ce, valid.sum(), temperature, kd_weight)


def kd_loss_sampled_reference(student_logits: torch.Tensor, sample_ids: torch.Tensor, sample_counts: torch.Tensor,
                              teacher_entropy: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              temperature: float = 3.0, kd_weight: float = 0.8) -> KDLoss:
    """`kd_loss_sampled` from the student's full logits (B, T, V), unchunked, by autograd (tests)."""
    check_kd(temperature, kd_weight)
    labels = next_token_labels(input_ids, attention_mask)  # (B, T-1)
    valid = labels != IGNORE_INDEX
    z = _fp32(student_logits[:, :-1][valid])  # (N, V)
    counts = _fp32(sample_counts[valid])
    p_hat = torch.zeros_like(z).scatter_add_(-1, sample_ids[valid].long(), counts / counts.sum(-1, keepdim=True))
    kl = -_fp32(teacher_entropy[valid]).sum() - (p_hat * F.log_softmax(z / temperature, dim=-1)).sum()
    ce = F.cross_entropy(z, labels[valid], reduction="sum")
    return _combine(kl, ce, valid.sum(), temperature, kd_weight)
