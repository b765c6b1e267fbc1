"""The science of ERW (losses, transport, samplers, per-image randomness, data, warm start, generation, the training
step), which imports nothing of operations/, and the training loop (loop.py) that runs it."""
