"""Data: reading corpora and the prepared (split, tokenized, packed) Arrow dataset."""
