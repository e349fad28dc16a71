"""Serving: measured continuous batching and timing (`bench`, `bench-serving`), the workload, the KV-memory
queueing analysis and its discrete-event simulator (`capacity`)."""
