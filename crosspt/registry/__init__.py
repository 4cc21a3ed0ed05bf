"""MLflow side of runs that outlive a search: the store, experiments and runs, a trial's logger, provenance, the
best-run rule, the runs table's view, source-prompt banks, promotion, the pyfunc bundle and predictor, PEFT
export. Reads MLflow runs; never imports `crosspt.search`."""
