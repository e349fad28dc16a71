"""prepare-data: corpus → held-out/train split (MD5 rule) → tokens → packed Arrow sequences.

Streams: documents are read, split, tokenized and packed a batch at a time, so memory stays flat
whatever the corpus size. Tokenization uses the model's fast tokenizer on whole batches, which runs
on all cores (the Rust backend parallelises a batch).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from bltool import ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, write_manifest
from bltool.configs import PrepareDataConfig
from bltool.data.corpus import CorpusReader, Document
from bltool.data.prepared import SPLIT_RULE, SPLITS, Packer, SplitWriter, is_heldout, token_byte_counts
from bltool.errors import UsageError
from bltool.models.loading import load_tokenizer, model_inputs, resolve_model, tokenizer_identity

BATCH_CHARS = 4_000_000  # tokenize about this much text per call
# Pretraining document separators, preferred (in this order) over the EOS when the vocabulary has one: an
# instruct model's EOS is often its chat turn end (SmolLM2-Instruct's `<|im_end|>`), not what its
# pretraining corpus was joined with (`<|endoftext|>`).
PRETRAINING_SEPARATORS = ("<|endoftext|>",)


def document_separator(tokenizer, doc_sep: str | None, source: str = "") -> dict:
    """The token that follows every document: `doc_sep` when given (a vocabulary entry such as
    `<|endoftext|>`, or text that encodes to exactly one token), else the first of PRETRAINING_SEPARATORS
    the vocabulary has, else the EOS. Returns {"token", "id", "chosen_by"} as the manifest records it."""
    vocab = tokenizer.get_vocab()
    if doc_sep is not None:
        if doc_sep in vocab:
            return {"token": doc_sep, "id": int(vocab[doc_sep]), "chosen_by": "--doc-sep"}
        encoded = tokenizer(doc_sep, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            return {"token": doc_sep, "id": int(encoded[0]), "chosen_by": "--doc-sep"}
        raise UsageError(f"--doc-sep {doc_sep!r} is not a single token of the tokenizer's vocabulary "
                         f"(it encodes to {len(encoded)} tokens)")
    for token in PRETRAINING_SEPARATORS:
        if token in vocab:
            return {"token": token, "id": int(vocab[token]), "chosen_by": "default: the pretraining separator"}
    if tokenizer.eos_token_id is None:
        raise UsageError(f"--tokenizer: {source} has no EOS token to join documents with; name one with --doc-sep")
    return {"token": tokenizer.eos_token, "id": int(tokenizer.eos_token_id), "chosen_by": "default: the EOS"}


def _batches(docs, limit: int):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def run(config: PrepareDataConfig) -> Path:
    check_output_dir(Path(config.out), config.overwrite, stage=Stage.PREPARE_DATA,
                     inputs=[*(("INPUT", p) for p in config.inputs), *model_inputs("--tokenizer", config.tokenizer)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    reader = CorpusReader([Path(p) for p in config.inputs], config.glob, config.text_field, config.id_field)
    model = resolve_model(config.tokenizer, flag="--tokenizer")
    tokenizer = load_tokenizer(model, flag="--tokenizer")
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"--tokenizer: {config.tokenizer} has no fast tokenizer (needed for batched tokenizing)")
    separator = document_separator(tokenizer, config.doc_sep, config.tokenizer)
    identity = {**tokenizer_identity(tokenizer), "source": config.tokenizer, "model": model.describe()}
    sep = separator["id"]
    stats = {s: {"documents": 0, "tokens": 0, "sequences": 0, "text_bytes": 0} for s in SPLITS}
    watch = ui.Stopwatch()

    with atomic_output(Path(config.out), config.overwrite) as tmp:
        # held-out windows also carry per-token byte counts, for bits-per-byte
        writers = {s: SplitWriter(tmp / f"{s}.arrow", with_bytes=s == "heldout") for s in SPLITS}
        packers = {s: Packer(config.seq_len, sep, with_bytes=s == "heldout") for s in SPLITS}
        total = reader.total_bytes()
        tokens = 0
        with ui.byte_progress() as progress:
            task = progress.add_task(Stage.PREPARE_DATA, total=total or None, tokens=0)
            for batch in _batches(reader, BATCH_CHARS):
                held = [is_heldout(d.key, config.heldout) for d in batch]
                for split in SPLITS:
                    docs = [d for d, h in zip(batch, held) if h == (split == "heldout")]
                    tokens += _encode(docs, tokenizer, packers[split], writers[split], stats[split])
                progress.update(task, advance=sum(d.nbytes for d in batch), tokens=tokens)
        for split in SPLITS:
            writers[split].write(packers[split].flush())
            writers[split].close()
            stats[split]["sequences"] = writers[split].sequences
        seconds = watch.seconds

        documents = stats["train"]["documents"] + stats["heldout"]["documents"]
        where = ", ".join(config.inputs)
        if documents == 0:
            raise UsageError(f"INPUT: no documents found in {where} (glob {config.glob!r} for directories)")
        if stats["heldout"]["documents"] == 0:
            raise UsageError(
                f"--heldout {config.heldout}: none of the {documents} documents fell in the held-out split; "
                "raise --heldout or add documents"
            )
        if stats["train"]["documents"] == 0:
            raise UsageError(f"--heldout {config.heldout}: every document fell in the held-out split; lower it")
        write_manifest(
            tmp,
            Stage.PREPARE_DATA,
            config=asdict(config),
            inputs=[r.as_dict() for r in reader.records],
            tokenizer=identity,
            doc_sep=separator,
            split={"rule": SPLIT_RULE, "heldout_fraction": config.heldout,
                   "key": f"the {config.id_field!r} field when present, else the document's UTF-8 text"
                   if config.id_field else "the document's UTF-8 text"},
            splits=stats,
            timing={"seconds": round(seconds, 3), "tokens": tokens,
                    "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
                    "cpu_count": os.cpu_count()},
        )
    ui.info(
        f"{documents:,} documents → train {stats['train']['tokens']:,} tokens "
        f"({stats['train']['sequences']:,} seqs), held-out {stats['heldout']['tokens']:,} tokens "
        f"({stats['heldout']['documents']:,} docs); {tokens / max(seconds, 1e-9):,.0f} tok/s"
    )
    return Path(config.out)


def _encode(docs: list[Document], tokenizer, packer: Packer, writer: SplitWriter, stats: dict) -> int:
    """Tokenize one batch of documents of a split, pack them, and stream full windows out."""
    if not docs:
        return 0
    texts = [d.text for d in docs]
    with_bytes = packer.with_bytes
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_bytes, verbose=False)
    count = 0
    for i, ids in enumerate(encoded["input_ids"]):
        text = texts[i]
        nbytes = len(text.encode("utf-8"))
        if with_bytes:
            per_token = token_byte_counts(text, encoded["offset_mapping"][i])
            windows = packer.add(ids, per_token, tail_bytes=nbytes - int(per_token.sum()))
        else:
            windows = packer.add(ids)
        writer.write(windows)
        count += len(ids) + 1  # + the separator
        stats["documents"] += 1
        stats["text_bytes"] += nbytes
    stats["tokens"] += count
    return count
