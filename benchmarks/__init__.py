"""The project's own measuring scripts (run from the checkout: `python -m benchmarks.<name>`), beside the
tables they write. They import crosspt as any user does; nothing in crosspt imports them."""
