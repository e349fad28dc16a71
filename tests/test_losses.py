"""The distillation loss (docs/method.md §4): a hand-computed value, chunked = unchunked (values and gradients),
padding, the α_kd extremes, no teacher gradient, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bltool.errors import UsageError
from bltool.train.losses import (
    kd_loss,
    kd_loss_reference,
    kd_loss_sampled,
    kd_loss_sampled_reference,
    kd_loss_topk,
    kd_loss_topk_reference,
)
from bltool.train.teacher_cache import teacher_topk


def identity_head(v: int) -> torch.nn.Linear:
    """A bias-free head whose logits are the hidden state itself, so tests can set logits directly."""
    head = torch.nn.Linear(v, v, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.eye(v))
    return head


def softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in z]
    return [x / sum(e) for x in e]


def test_hand_computed_value():
    # B=2, T=3, V=3; row 1 is right-padded after 2 tokens, so 3 predicted positions in all.
    z_s = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 9.0, 9.0]],
           [[0.3, 0.2, -0.4], [7.0, 7.0, 7.0], [5.0, 5.0, 5.0]]]
    z_t = [[[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [9.0, 0.0, 0.0]],
           [[-1.0, 2.5, 0.0], [0.0, 7.0, 0.0], [0.0, 0.0, 5.0]]]
    ids = [[0, 2, 1], [2, 1, 0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    temp, alpha = 2.0, 0.8
    kls, ces = [], []
    for b, t in [(0, 0), (0, 1), (1, 0)]:  # (row, position) of the predicted tokens
        p, q = softmax(z_t[b][t], temp), softmax(z_s[b][t], temp)
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        ces.append(-math.log(softmax(z_s[b][t], 1.0)[ids[b][t + 1]]))
    kl, ce = sum(kls) / 3, sum(ces) / 3
    expected = alpha * temp**2 * kl + (1 - alpha) * ce

    s, t = torch.tensor(z_s, dtype=torch.float64), torch.tensor(z_t, dtype=torch.float64)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    head = identity_head(3)
    for chunk in (1, 2, 256):
        out = kd_loss(s, t, head, head, ids_t, mask_t, temperature=temp, kd_weight=alpha, chunk=chunk)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12)
        assert out.kl.item() == pytest.approx(kl, rel=1e-6)  # the parts are reported in float32
        assert out.ce.item() == pytest.approx(ce, rel=1e-6)
    ref = kd_loss_reference(s, t, ids_t, mask_t, temperature=temp, kd_weight=alpha)
    assert ref.loss.item() == pytest.approx(expected, rel=1e-12)


def make_batch(seed: int = 0, b: int = 2, t: int = 9, d_s: int = 8, d_t: int = 6, v: int = 11):
    """Random float64 hidden states and heads (the teacher has another hidden size); row 1 is padded."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, t, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(b, t, d_t, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    head_s = torch.nn.Linear(d_s, v, dtype=torch.float64)
    head_t = torch.nn.Linear(d_t, v, bias=False, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0  # row 1: 6 tokens, then right padding
    return h_s, h_t, head_s, head_t, ids, mask


def grads(loss, h_s, head_s):
    return torch.autograd.grad(loss, [h_s, head_s.weight, head_s.bias])


def test_chunked_equals_unchunked():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    ref = kd_loss_reference(head_s(h_s), head_t(h_t), ids, mask)
    ref_grads = grads(ref.loss, h_s, head_s)
    for chunk in (1, 2, 3, 8, 9, 100):
        out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=chunk)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.kl, ref.kl)
        torch.testing.assert_close(out.ce, ref.ce)
        for got, want in zip(grads(out.loss, h_s, head_s), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunk_counts_tokens_over_the_rows(monkeypatch):
    """--chunk is tokens (rows × positions), so a chunk's (n, V) logits stay at most `chunk` rows whatever
    the batch: 4 rows at chunk 8 run 2 positions at a time. Both heads are applied through
    `bltool.adapt.kernels.linear`; the spy records the rows of every head application and calls the real one."""
    import bltool.train.losses as losses

    rows, real = [], losses.linear
    monkeypatch.setattr(losses, "linear", lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    h_s, h_t, head_s, head_t, ids, mask = make_batch(b=4, t=10)
    ref = kd_loss_reference(head_s(h_s), head_t(h_t), ids, mask)
    with torch.no_grad():
        out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=8)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    # 9 predicting positions, 2 at a time: 5 chunks, each head once per chunk, 8 rows (the last 4)
    assert rows == [8, 8, 8, 8, 8, 8, 8, 8, 4, 4]
    rows.clear()
    with torch.no_grad():
        kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=3)  # fewer tokens than rows: one position
    assert rows == [4] * 18


def test_padding_does_not_matter():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=4)
    g = grads(out.loss, h_s, head_s)
    assert g[0][1, 5:].abs().max() == 0  # positions whose target is padding get no gradient
    # Other values at the padded positions (hidden states and token ids) change nothing.
    h_s2, h_t2, ids2 = h_s.detach().clone(), h_t.clone(), ids.clone()
    h_s2[1, 6:] = 100.0
    h_t2[1, 6:] = -50.0
    ids2[1, 6:] = 0
    h_s2.requires_grad_()
    out2 = kd_loss(h_s2, h_t2, head_s, head_t, ids2, mask, chunk=4)
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-13, atol=0)
    for got, want in zip(grads(out2.loss, h_s2, head_s), g):
        torch.testing.assert_close(got, want)
    ref2 = kd_loss_reference(head_s(h_s2), head_t(h_t2), ids2, mask)
    torch.testing.assert_close(ref2.loss, out.loss, rtol=1e-12, atol=0)
    # A one-row batch: its padded form equals its unpadded form.
    one = kd_loss(h_s[1:, :6], h_t[1:, :6], head_s, head_t, ids[1:, :6], mask[1:, :6])
    padded = kd_loss(h_s[1:], h_t[1:], head_s, head_t, ids[1:], mask[1:])
    torch.testing.assert_close(padded.loss, one.loss, rtol=1e-13, atol=0)


def test_kd_weight_zero_is_cross_entropy():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, kd_weight=0.0, chunk=3)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    want = F.cross_entropy(head_s(h_s)[:, :-1].transpose(1, 2), labels, ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)


def test_kd_weight_one_identical_models_is_zero():
    h_s, _, head_s, _, ids, mask = make_batch()
    out = kd_loss(h_s, h_s, head_s, head_s, ids, mask, kd_weight=1.0, chunk=4)
    assert abs(out.loss.item()) < 1e-12
    assert out.ce.item() > 0  # the CE part is still measured, only weighted by 0


def test_teacher_gets_no_gradient():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    h_t.requires_grad_()
    for chunk in (4, 100):
        out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=chunk)
        out.loss.backward()
        assert h_t.grad is None and head_t.weight.grad is None
        assert h_s.grad is not None and head_s.weight.grad.abs().sum() > 0
        assert not out.kl.requires_grad and not out.ce.requires_grad
        h_s.grad = None
        head_s.zero_grad()


def test_no_grad_and_bf16():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    with torch.no_grad():
        out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=4)
    torch.testing.assert_close(out.loss, kd_loss_reference(head_s(h_s), head_t(h_t), ids, mask).loss)
    # bf16 hidden states and heads: logits are upcast, the loss is float32.
    low = kd_loss(h_s.bfloat16(), h_t.bfloat16(), head_s.bfloat16(), head_t.bfloat16(), ids, mask, chunk=4)
    assert low.loss.dtype == low.kl.dtype == low.ce.dtype == torch.float32
    assert low.loss.item() == pytest.approx(out.loss.item(), rel=0.05)


def test_all_padding_batch_is_zero_and_backpropagates():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    mask[:, 1:] = 0
    out = kd_loss(h_s, h_t, head_s, head_t, ids, mask)
    assert out.loss.item() == 0
    out.loss.backward()
    assert h_s.grad.abs().sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"temperature": 0.0}, "--temperature"),
        ({"temperature": -1.0}, "--temperature"),
        ({"temperature": math.nan}, "--temperature"),
        ({"temperature": math.inf}, "--temperature"),
        ({"kd_weight": -0.1}, "--kd-weight"),
        ({"kd_weight": 1.5}, "--kd-weight"),
        ({"kd_weight": math.nan}, "--kd-weight"),
        ({"chunk": 0}, "--chunk"),
    ],
)
def test_bad_arguments(kwargs, flag):
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    with pytest.raises(UsageError, match=flag):
        kd_loss(h_s, h_t, head_s, head_t, ids, mask, **kwargs)
    if "chunk" not in kwargs:
        with pytest.raises(UsageError, match=flag):
            kd_loss_reference(head_s(h_s), head_t(h_t), ids, mask, **kwargs)


# -- the teacher-logits (top-k) form ---------------------------------------------------------------------


def topk_inputs(h_t, head_t, k, temperature=3.0):
    """What the cache holds for these hidden states (before float16 storage of the logits)."""
    return teacher_topk(h_t, head_t, k, temperature)


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_topk_with_the_whole_vocabulary_equals_the_full_loss(chunk):
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    full = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=chunk)
    top = kd_loss_topk(h_s, head_s, *topk_inputs(h_t, head_t, 11), ids, mask, chunk=chunk)
    torch.testing.assert_close(top.loss, full.loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(top.loss, h_s, head_s), grads(full.loss, h_s, head_s)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_topk_tail_is_one_bucket_hand_computed():
    # One predicted position, V = 4, k = 2: teacher logits [3, 1, 0, -1], student logits [0, 2, 1, 1].
    t = 2.0
    z_t, z_s = [3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 1.0]
    p, q = softmax(z_t, t), softmax(z_s, t)
    p_tail, q_tail = p[2] + p[3], q[2] + q[3]
    kl = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]) + p_tail * math.log(p_tail / q_tail)
    ce = -math.log(softmax(z_s, 1.0)[2])
    h_s = torch.tensor([[z_s, [0.0] * 4]], dtype=torch.float64)  # (1, 2, 4); the 2nd position is the last
    ids, mask = torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)
    lse = torch.tensor([[math.log(sum(math.exp(z / t) for z in z_t))]], dtype=torch.float64)
    log_tail = torch.tensor([[math.log(p_tail)]], dtype=torch.float64)
    out = kd_loss_topk(h_s, identity_head(4), torch.tensor([[[0, 1]]]), torch.tensor([[[3.0, 1.0]]]), lse,
                       log_tail, ids, mask, temperature=t, kd_weight=0.5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * t**2 * kl + 0.5 * ce, rel=1e-6)
    # the coarse-grained KL is a lower bound on the full KL
    full = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kl <= full


def test_topk_padding_and_no_nan_at_padded_positions():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    top_ids, top_logits, lse, tail = topk_inputs(h_t, head_t, 3)
    top_ids[1, 5:], top_logits[1, 5:], lse[1, 5:], tail[1, 5:] = 0, 0.0, 0.0, 0.0  # the cache's padding
    out = kd_loss_topk(h_s, head_s, top_ids, top_logits, lse, tail, ids, mask, chunk=4)
    assert torch.isfinite(out.loss)
    g = grads(out.loss, h_s, head_s)
    assert g[0][1, 5:].abs().max() == 0 and torch.isfinite(g[0]).all()


# -- precision of the top-k form against a float64 reference -------------------------------------------


def _coarse_reference(z_t, z_s, labels, k, t, kd_weight):
    """The §4 loss with the KL coarse-grained to the teacher's top k + one tail bucket, in float64 from
    the full logits (N, V)."""
    log_p, log_q = torch.log_softmax(z_t / t, -1), torch.log_softmax(z_s / t, -1)
    top = z_t.topk(k, -1).indices
    in_top = torch.zeros_like(z_t, dtype=torch.bool).scatter(-1, top, True)
    p_tail, q_tail = log_p.exp().masked_fill(in_top, 0).sum(-1), log_q.exp().masked_fill(in_top, 0).sum(-1)
    kl = (log_p.exp().gather(-1, top) * (log_p.gather(-1, top) - log_q.gather(-1, top))).sum(-1)
    kl = kl + p_tail * (p_tail.log() - q_tail.log())
    ce = torch.nn.functional.cross_entropy(z_s, labels, reduction="none")
    return kd_weight * t**2 * kl.mean() + (1 - kd_weight) * ce.mean(), p_tail


@pytest.mark.parametrize("t", [1.0, 3.0])
@pytest.mark.parametrize("student_tail", ["ordinary", "tiny"])
def test_topk_cache_path_matches_a_float64_reference(t, student_tail):
    """The teacher's logits go through what `teacher-logits` stores (top-k logits in float16, lse and the
    tail's log-mass in float32), the student's are float32: loss and gradient match the float64 coarse
    KL. A peaked teacher keeps a few % of its mass in the tail; a "tiny" student tail (1e-9) is where
    1 − Σ q in float32 has no precision left."""
    g = torch.Generator().manual_seed(0)
    n, v, k = 6, 50, 8
    z_t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    z_t[:, :k] += 5.0 * t  # a peaked teacher: its top k hold most, not all, of the mass (≈ 3% left)
    z_s = torch.randn(n, v, generator=g, dtype=torch.float64)
    if student_tail == "tiny":
        z_s[:, k:] -= 22.0 * t  # the student leaves ~1e-9 of its mass outside the teacher's top k
    labels = torch.randint(0, v, (n,), generator=g)
    ref_input = z_s.clone().requires_grad_(True)
    ref_loss, p_tail = _coarse_reference(z_t, ref_input, labels, k, t, 0.8)
    ref_loss.backward()
    assert 0.005 < float(p_tail.mean()) < 0.2

    # the cache: one sequence of n + 1 tokens whose n predicting positions have these logits
    ids, values, lse, tail = teacher_topk(torch.cat([z_t.float(), z_t.float()[:1]])[None],
                                          identity_head(v).float(), k, t)
    values = values.half().float()  # float16 storage
    assert torch.allclose(tail[0].double().exp(), p_tail, rtol=1e-5)  # the tail's mass, exact to float32
    h_s = torch.cat([z_s.float(), z_s.float()[:1]])[None].requires_grad_(True)  # (1, n + 1, V)
    input_ids = torch.cat([torch.zeros(1, dtype=torch.long), labels])[None]
    mask = torch.ones_like(input_ids)
    out = kd_loss_topk(h_s, identity_head(v).float(), ids, values, lse, tail, input_ids, mask, temperature=t)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=2e-4)
    grad, ref_grad = h_s.grad[0, :n].double(), ref_input.grad
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_topk_cache_with_a_teacher_tail_near_1e_7_matches_a_float64_reference(t, tmp_path):
    """The precision the float32 tail exists for: the teacher's top k hold all but ~1e-7 of its mass, the
    student leaves ~3e-7 outside them. The teacher's logits go through the cache as `teacher-logits`
    writes and `distill` reads it (CacheWriter → TeacherCache), the student's loss runs in float32; the
    gradient on the tokens outside the top k, q_j · (1 − p_tail / Q_tail), matches the float64
    full-vocabulary reference to 1e-4. 1 − Σ top-k in float32 has no digit of p_tail left at 1e-7
    (float32's spacing below 1 is 6e-8), so a tail stored or computed that way misses it by ~100%."""
    from bltool.train.teacher_cache import CacheWriter, TeacherCache

    g = torch.Generator().manual_seed(4)
    n, v, k = 6, 50, 8
    z_t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    target = torch.linspace(5e-8, 3e-7, n, dtype=torch.float64)  # the teacher's tail mass, row by row
    gap = torch.logsumexp(z_t[:, k:] / t, -1) - torch.logsumexp(z_t[:, :k] / t, -1) - target.log()
    z_t[:, :k] += t * gap[:, None]
    z_t = z_t.float().double()  # the teacher's logits as its float32 head gives them
    z_s = z_t + 0.3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    z_s[:, k:] += t * math.log(3.0)  # the student's tail: about three times the teacher's
    z_s = z_s.float().double()
    labels = torch.randint(0, v, (n,), generator=g)
    ref_input = z_s.clone().requires_grad_(True)
    ref_loss, p_tail = _coarse_reference(z_t, ref_input, labels, k, t, 0.8)
    ref_loss.backward()
    assert torch.allclose(p_tail, target, rtol=1e-6)

    # the cache: one sequence of n + 1 tokens whose n predicting positions have these logits, written and read
    top = teacher_topk(torch.cat([z_t.float(), z_t.float()[:1]])[None], identity_head(v).float(), k, t)
    writer = CacheWriter(tmp_path / "part.arrow")
    writer.write([0], *top, [n + 1])
    writer.close()
    cache = TeacherCache(tmp_path, {"config": {"top_k": k, "temperature": t},
                                    "shards": [{"file": "part.arrow", "rows": 1}]})
    ids, values, lse, tail = cache.batch([0], n + 1, "cpu")
    assert torch.equal(ids[0], z_t.topk(k, -1).indices)
    h_s = torch.cat([z_s.float(), z_s.float()[:1]])[None].requires_grad_(True)  # (1, n + 1, V)
    input_ids = torch.cat([torch.zeros(1, dtype=torch.long), labels])[None]
    out = kd_loss_topk(h_s, identity_head(v).float(), ids, values, lse, tail, input_ids, torch.ones_like(input_ids),
                       temperature=t)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=2e-4)
    grad, ref_grad = h_s.grad[0, :n].double(), ref_input.grad
    outside = torch.ones(n, v, dtype=torch.bool).scatter(-1, ids[0], False)
    torch.testing.assert_close(grad[outside], ref_grad[outside], rtol=1e-4, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())


# -- the fused pass: exact against autograd, nothing kept, nothing recomputed ---------------------------


@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("k", [3, 11])  # 11 = V: the coarse-grained KL is the full KL
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_fused_topk_equals_autograd_in_float64(t, k, chunk):
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    top = teacher_topk(h_t, head_t, k, t)
    ref = kd_loss_topk_reference(head_s(h_s), *top, ids, mask, temperature=t, kd_weight=0.7)
    out = kd_loss_topk(h_s, head_s, *top, ids, mask, temperature=t, kd_weight=0.7, chunk=chunk)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.kl, ref.kl)
    torch.testing.assert_close(out.ce, ref.ce)
    for got, want in zip(grads(out.loss, h_s, head_s), grads(ref.loss, h_s, head_s)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    if k == 11:  # and the full live form agrees
        full = kd_loss_reference(head_s(h_s), head_t(h_t), ids, mask, temperature=t, kd_weight=0.7)
        torch.testing.assert_close(out.loss, full.loss, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_fused_live_equals_autograd_at_other_temperatures(t):
    h_s, h_t, head_s, head_t, ids, mask = make_batch(seed=3)
    ref = kd_loss_reference(head_s(h_s), head_t(h_t), ids, mask, temperature=t, kd_weight=0.3)
    out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, temperature=t, kd_weight=0.3, chunk=4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    for got, want in zip(grads(out.loss, h_s, head_s), grads(ref.loss, h_s, head_s)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_fused_backward_follows_the_upstream_gradient_and_the_normalizer():
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    one = grads(kd_loss(h_s, h_t, head_s, head_t, ids, mask).loss, h_s, head_s)
    three = grads(3.0 * kd_loss(h_s, h_t, head_s, head_t, ids, mask).loss, h_s, head_s)
    half = grads(kd_loss(h_s, h_t, head_s, head_t, ids, mask, normalizer=2 * 13).loss, h_s, head_s)  # 8 + 5 predicted
    for a, b, c in zip(one, three, half):
        torch.testing.assert_close(b, 3 * a)
        torch.testing.assert_close(c, a / 2)


def test_a_frozen_head_gets_no_gradient_and_costs_no_weight_gradient():
    from torch.utils.flop_counter import FlopCounterMode

    h_s, h_t, head_s, head_t, ids, mask = make_batch(b=2, t=33, d_s=16, d_t=24, v=64)
    mask[:] = 1
    n, v, d_s, d_t = 2 * 32, 64, 16, 24
    head = {"fwd_s": 2 * n * d_s * v, "fwd_t": 2 * n * d_t * v, "grad_h": 2 * n * v * d_s, "grad_w": 2 * n * v * d_s}
    for trains in (True, False):
        head_s.requires_grad_(trains)
        with FlopCounterMode(display=False) as counter:
            out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=8)
            out.loss.backward()
        # each head once per position, the student's hidden-state gradient once, the weight's when it trains
        want = head["fwd_s"] + head["fwd_t"] + head["grad_h"] + (head["grad_w"] if trains else 0)
        assert counter.get_total_flops() == want
        assert (head_s.weight.grad is not None) == trains
        h_s.grad = None
        head_s.zero_grad(set_to_none=True)


def test_the_graph_keeps_no_vocabulary_sized_activation():
    h_s, h_t, head_s, head_t, ids, mask = make_batch(b=2, t=40, d_s=4, d_t=4, v=500)
    head_s.requires_grad_(False)  # as for the LoRA methods: then only the hidden states' gradient is kept
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=8)
    assert saved and max(math.prod(s) for s in saved) == h_s.numel()  # (B, T, d), not (B, c, V) or more
    out.loss.backward()


# -- the sampled form (teacher-logits --sample): unbiased where top-k is not ----------------------------


def _sampled(z_t: torch.Tensor, t: float, n: int, streams: range, seed: int = 0):
    """What a sampled cache holds for teacher logits z_t (P, V), drawn once per stream (as for one
    sequence each): ids and counts (S, P, n), the teacher's entropy (S, P)."""
    from bltool.train.teacher_cache import padded_samples, sample_uniforms, teacher_sample_rows

    p, v = z_t.shape
    uniforms = torch.cat([sample_uniforms(seed, s, p, n) for s in streams])
    ids, counts, unique, entropy = teacher_sample_rows(z_t.repeat(len(streams), 1), identity_head(v), t, uniforms,
                                                       chunk=4096)
    ids, counts = padded_samples(ids.numpy(), counts.numpy(), unique.numpy(), n)
    return (torch.from_numpy(ids).view(len(streams), p, n), torch.from_numpy(counts).double().view(len(streams), p, n),
            entropy.view(len(streams), p))


def test_sampled_cache_gradient_is_unbiased_where_topk_is_biased():
    """Averaged over 3000 independent caches (N = 8 draws per position), the sampled form's gradient with
    respect to the student's logits converges to the full-KD gradient: every element's mean lies within
    5 standard errors of it and the mean squared z-score is ≈ 1. The top-k form with k = 8 (as many ids)
    misses it by far more than that, on the same case: a teacher with a few large logits and a broad tail
    that the student spreads differently."""
    g = torch.Generator().manual_seed(7)
    p, v, t, n, draws = 4, 40, 3.0, 8, 3000
    z_t = torch.randn(p, v, generator=g, dtype=torch.float64) * 2.0
    z_t[:, :3] += 6.0
    z_s = torch.randn(p, v, generator=g, dtype=torch.float64) * 1.5
    input_ids = torch.randint(0, v, (1, p + 1), generator=g)
    mask = torch.ones_like(input_ids)
    pad = lambda z: torch.cat([z, z[:1]])[None]  # noqa: E731 — p + 1 positions, the last predicts nothing

    h = pad(z_s).requires_grad_(True)  # identity heads: the hidden states are the logits
    full = kd_loss_reference(h, pad(z_t), input_ids, mask, temperature=t)
    (want,) = torch.autograd.grad(full.loss, h)
    want = want[0, :p]

    ids, counts, entropy = _sampled(z_t, t, n, range(draws))
    hs = pad(z_s).repeat(draws, 1, 1).requires_grad_(True)  # one copy of the student per cache
    out = kd_loss_sampled(hs, identity_head(v), ids, counts, entropy, input_ids.repeat(draws, 1),
                          mask.repeat(draws, 1), temperature=t, chunk=4096, normalizer=p)  # Σ of each copy's mean
    (each,) = torch.autograd.grad(out.loss, hs)
    each = each[:, :p]  # (draws, p, V): the gradient of each cache's loss
    mean, se = each.mean(0), each.std(0) / math.sqrt(draws)
    drawn = se > 0  # every token with mass worth drawing was drawn; the rest must be negligible
    zscore = (mean - want)[drawn] / se[drawn]
    assert float(zscore.abs().max()) < 5 and float(zscore.square().mean()) < 1.5
    assert float((mean - want)[~drawn].abs().sum()) < 1e-4 * float(want.abs().max())
    assert float((out.kl / draws - full.kl).abs()) < 0.05 * float(full.kl)  # the value is unbiased too

    top = kd_loss_topk(h, identity_head(v), *teacher_topk(pad(z_t), identity_head(v), n, t), input_ids, mask,
                       temperature=t)
    (biased,) = torch.autograd.grad(top.loss, h)
    assert float(((biased[0, :p] - want)[drawn] / se[drawn]).abs().max()) > 20


@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_fused_sampled_equals_autograd_in_float64(t, chunk):
    h_s, h_t, head_s, head_t, ids, mask = make_batch()
    z_t = head_t(h_t)[:, :-1].detach()  # (2, 8, V)
    sample_ids, counts, entropy = _sampled(z_t.reshape(-1, z_t.shape[-1]), t, 6, range(1))
    cached = (sample_ids.view(2, 8, 6), counts.view(2, 8, 6), entropy.view(2, 8))
    cached[1][1, 5:] = 0  # the cache's padding: no draws past the row's end
    ref = kd_loss_sampled_reference(head_s(h_s), *cached, ids, mask, temperature=t, kd_weight=0.7)
    out = kd_loss_sampled(h_s, head_s, *cached, ids, mask, temperature=t, kd_weight=0.7, chunk=chunk)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.kl, ref.kl)
    torch.testing.assert_close(out.ce, ref.ce)
    fused = grads(out.loss, h_s, head_s)
    for got, want in zip(fused, grads(ref.loss, h_s, head_s)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert fused[0][1, 5:].abs().max() == 0  # padding: no gradient
