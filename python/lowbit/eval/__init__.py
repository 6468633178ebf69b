"""Evaluation: perplexity and KL divergence against the unquantized model, and a memory
estimate for a quantization scheme before running it."""

from .memory import MemoryEstimate, memory_estimate
from .perplexity import kl_divergence, perplexity

__all__ = ["MemoryEstimate", "kl_divergence", "memory_estimate", "perplexity"]
