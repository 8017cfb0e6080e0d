"""Prefect flows: each composes tasks/ and nothing else."""
