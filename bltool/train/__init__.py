"""What `distill` and `teacher-logits` are made of: batches, the budget controller, the KD loss, the teacher
cache, checkpoints, signals, processes and training-compute accounting."""
