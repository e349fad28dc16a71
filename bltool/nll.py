"""Next-token negative log-likelihood, computed over sequence chunks.

Full-vocabulary logits are large (batch × 1024 × 49152 floats for SmolLM2 is 200 MB per sequence in
float32), so the LM head is applied to `chunk` positions at a time and each chunk's logits are freed
before the next: peak memory grows with the chunk, not the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, d) from the decoder stack, before the LM head."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """NLL in nats of each next token, (B, T-1) float32; 0 where the target is padding.

    Position t predicts token t+1; a target counts when its attention_mask is 1 (right padding only).
    """
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, d)
    head = model.get_output_embeddings()
    targets = input_ids[:, 1:]  # (B, T-1)
    valid = attention_mask[:, 1:].bool()
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    for start in range(0, targets.shape[1], chunk):
        stop = min(start + chunk, targets.shape[1])
        logits = head(hidden[:, start:stop]).float()  # (B, c, V) in float32
        nll[:, start:stop] = F.cross_entropy(
            logits.transpose(1, 2), targets[:, start:stop], reduction="none"
        )  # (B, c)
        del logits
    return nll * valid


def heldout_windows(data, max_tokens: int):
    """(ids, token bytes) of a prepared dataset's held-out windows in file order, the last one cut so the
    total is at most `max_tokens`: the slice `eval-ppl` scores, and `distill --eval-every` (the same for
    every run on the same data and budget)."""
    left = max_tokens
    for ids, nbytes in data.iter_sequences("heldout"):
        if left < 2:
            return
        if len(ids) > left:
            ids, nbytes = ids[:left], nbytes[:left]
        left -= len(ids)
        yield ids, nbytes
