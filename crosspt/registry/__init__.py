"""MLflow side of runs that outlive a search: tracking helpers, source-prompt banks, promotion, the pyfunc
bundle and predictor, PEFT export. Reads MLflow runs; never imports `crosspt.search`."""
