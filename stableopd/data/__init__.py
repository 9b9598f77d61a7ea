"""Prompt sources (JSONL, Parquet, the Hub) and the built-in worlds (arith)."""
