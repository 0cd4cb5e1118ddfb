"""Measuring a model: lm-eval harness wrapper and local tasks, WikiText-2 perplexity, speed and memory,
the choice of evaluation backend, and recovery tables."""
