"""The training machinery: the fused update, teacher scoring, distributed runs, checkpoints, tracking, run control."""
