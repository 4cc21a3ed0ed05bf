"""Baselines and the benchmark harness: every baseline is a configuration of the same model.

    methods    Method / MethodSpec: each baseline's prompt section, model builder and stage (the table)
    prompts    prompt modules besides CrossPTPrompt: empty, fixed, PEFT's prompt embeddings
    settings   BenchSettings: what a benchmark covers and the budget every method shares
    job        one job -> one result record; the per-process split cache
    harness    the grid in phases, sequential or on Ray actors; the summary
    stats      selection by validation, mean ± std tables, the full-mode estimate
    report     markdown, verdict, notes, bar chart, MLflow
"""
