"""The Tune + Optuna + ASHA driver, its MLflow trial logging, resume/reconcile."""
