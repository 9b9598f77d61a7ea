"""The algorithm: divergence kernels, losses, packed batches, repetition, the collapse detector, LR schedules (torch only)."""
