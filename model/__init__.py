"""Megatron-Core model, training loop and checkpoints. Runs under torchrun; knows nothing about Prefect."""
