"""`distill --activation-checkpointing` (bltool.models.compiling.checkpoint_layers): the backward recomputes each
student layer, so the activations kept between forward and backward shrink, and the loss and gradients
equal the plain run's, dropout included (the recomputation draws the same masks)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config

from bltool.adapt.lora import LoRASpec, inject_lora
from bltool.errors import UsageError
from bltool.eval.nll import hidden_states
from bltool.models.compiling import checkpoint_layers
from bltool.train.losses import kd_loss


def _student(layers: int = 3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64, layers, tied=True), dtype=torch.float32)
    inject_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=0.3))  # dropout: the recompute must redraw it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a LoRA path that changes the output, so its gradients are not trivial
    return model.train()


def _step(model, ids, teacher_hidden, head):
    """One loss + backward under a saved-tensors hook: (loss, {param: grad}, bytes kept for the backward)."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(7)  # the dropout masks of this forward
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = hidden_states(model, ids, None)
        result = kd_loss(hidden, teacher_hidden, model.get_output_embeddings(), head, ids, torch.ones_like(ids),
                         temperature=2.0, kd_weight=0.7, chunk=8, normalizer=ids.numel())
    result.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(result.loss.detach()), grads, sum(kept)


def test_checkpointed_layers_keep_less_and_compute_the_same_loss_and_gradients():
    plain = _student()
    checkpointed = copy.deepcopy(plain)
    assert checkpoint_layers(checkpointed) == 3
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    teacher_hidden = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(2))
    head = torch.nn.Linear(32, 64, bias=False).requires_grad_(False)

    loss_a, grads_a, kept_a = _step(plain, ids, teacher_hidden, head)
    loss_b, grads_b, kept_b = _step(checkpointed, ids, teacher_hidden, head)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:  # the same dropout masks in the recomputation, so the same gradients
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    # the plain run keeps every layer's activations for the backward; the checkpointed one only the
    # layers' inputs and the loss's few tensors
    assert kept_b < 0.25 * kept_a, (kept_b, kept_a)


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(UsageError, match="--activation-checkpointing"):
        checkpoint_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
