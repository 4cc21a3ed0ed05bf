"""Old import path of the pyfunc model: models registered before the package layout load
`crosspt.pyfunc_model.CrossPTPyfunc` from their stored code, so this module re-exports
`crosspt.registry.pyfunc` under its old name."""
from crosspt.registry.pyfunc import (BUNDLE_ARTIFACT, CONFIG, CrossPTPredictor, CrossPTPyfunc, find_bundle,
                                     match_task, model_signature, pip_requirements, read_manifest, stored_tasks,
                                     write_bundle)

__all__ = ["BUNDLE_ARTIFACT", "CONFIG", "CrossPTPredictor", "CrossPTPyfunc", "find_bundle", "match_task",
           "model_signature", "pip_requirements", "read_manifest", "stored_tasks", "write_bundle"]
