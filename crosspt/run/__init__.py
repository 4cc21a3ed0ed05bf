"""One configuration: what a run reads, model assembly, the kept backbone, the training loop, checkpoints, the
Ray Train trainer, fault injection."""
