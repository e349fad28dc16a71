"""Next-token negative log-likelihood, computed over sequence chunks.

Full-vocabulary logits are large (batch × 1024 × 49152 floats for SmolLM2 is 200 MB per sequence in
float32), so the LM head is applied to `chunk` positions at a time and each chunk's logits are freed
before the next: peak memory grows with the chunk, not the sequence.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bltool.data.prepared import PreparedData
from bltool.eval.stats import Pieces


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


def document_separator(data) -> int | None:
    """The separator's token id when it marks exactly the held-out split's documents: the split holds as
    many of them as the manifest counts held-out documents (`prepare-data` puts one after each). None
    otherwise (a document's own text holding the separator, a `--doc-sep` that also occurs inside
    documents, or data without the count): the documents are then not known."""
    documents = data.manifest.get("splits", {}).get("heldout", {}).get("documents")
    if documents is None:
        return None
    sep = int(data.doc_sep["id"])
    return sep if _count(Path(data.path), data.manifest["hash"], sep) == documents else None


@cache
def _count(path: Path, manifest_hash: str, token: int) -> int:
    """How often `token` occurs in a prepared dataset's held-out split (cached per artifact)."""
    data = PreparedData.open(path)
    return sum(int(np.count_nonzero(ids == token)) for ids, _ in data.iter_sequences("heldout"))


class PieceCounter:
    """Σ NLL, tokens and bytes scored per (window, document) piece of the held-out windows, fed in order
    (`heldout_windows`' windows, each with its row of `token_nll`): what `bltool.eval.stats.Pieces` holds.
    A target token belongs to the document it is part of; a separator to the document it ends."""

    def __init__(self, separator: int | None):
        self.separator = separator  # None: documents not known
        self.window = 0
        self.document = 0  # the document the next window starts in
        self.rows: list[tuple[int, int | None, int, int, float]] = []

    def add(self, windows: list[np.ndarray], nll: torch.Tensor, nbytes: list[np.ndarray | None] | None = None) -> None:
        values = nll.double().cpu().numpy()
        for row, ids in enumerate(windows):
            ids = np.asarray(ids)
            n = len(ids)
            ends = ids == self.separator if self.separator is not None else np.zeros(n, dtype=bool)
            # document of token t: the documents ended before it (a separator ends its own one)
            documents = self.document + np.concatenate(([0], np.cumsum(ends[:-1])))
            targets = documents[1:]
            scored = values[row, : n - 1]
            known = nbytes is not None and nbytes[row] is not None
            token_bytes = np.asarray(nbytes[row][1:n], dtype=np.int64) if known else np.zeros(n - 1, dtype=np.int64)
            for document in np.unique(targets):
                where = targets == document
                self.rows.append((self.window, int(document) if self.separator is not None else None,
                                  int(where.sum()), int(token_bytes[where].sum()), float(scored[where].sum())))
            self.document += int(ends.sum())
            self.window += 1

    def pieces(self) -> Pieces:
        return Pieces.from_rows([dict(zip(("window", "document", "tokens", "bytes", "nll"), r)) for r in self.rows])
