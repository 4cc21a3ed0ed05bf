"""The MLflow "model from code" entry of a promoted crosspt model.

`crosspt promote` logs this file as the pyfunc's `python_model` (a path, not an instance), so MLflow
stores the code and, on load, runs it instead of unpickling a `python_model.pkl`: loading a
registered crosspt model unpickles nothing."""
import mlflow.models

from crosspt.registry.pyfunc import CrossPTPyfunc

mlflow.models.set_model(CrossPTPyfunc())
