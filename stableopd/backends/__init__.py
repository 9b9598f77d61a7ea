"""Samplers behind one contract: the registry, Hugging Face generate, vLLM."""
