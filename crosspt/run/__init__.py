"""One configuration: model assembly, the training loop, checkpoints, the Ray Train trainer, fault injection."""
