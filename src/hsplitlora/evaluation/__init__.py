"""Evaluation: perplexity, generation, and the five E2E metrics as the official scorer computes them."""
