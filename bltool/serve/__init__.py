"""Serving: the engines (transformers, vLLM) behind one server protocol, measured continuous batching and
timing (`bench`, `bench-serving`), the workload, the KV-memory queueing analysis, capacity's plan, its
discrete-event simulators and its check against the measured server (`capacity`)."""
