"""The commands' work: distill, sft, rollout, validation, evaluate, export and the dry-run plan."""
