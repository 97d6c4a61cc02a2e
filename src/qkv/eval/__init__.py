"""Evaluation: how good a model is (perplexity on held-out text; benchmark tasks)."""
