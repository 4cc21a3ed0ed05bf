"""Tasks: the registry of task specs, data loaders and k-shot sampling, formatting, metrics."""
