"""Distributed building blocks of the trainer (sequence parallelism, sharding)."""
