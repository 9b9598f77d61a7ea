"""Model loading and compatibility checks, the built-in tiny and toy models, token pairing, LoRA."""
