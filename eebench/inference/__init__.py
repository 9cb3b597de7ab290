"""Inference: the early-exit engine (single, batched, streaming), threshold choice and the
latency / throughput benchmark."""
