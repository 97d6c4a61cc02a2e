"""Inference: KV caches (contiguous and paged), sampling, scheduler, engine, speculative decoding."""
