"""crosspt: multi-task cross-prompt tuning (CrossPT) on frozen language models.

Importing the package pulls in neither Ray nor MLflow: those live in the run/search layers.
"""
__version__ = "0.1.0"
