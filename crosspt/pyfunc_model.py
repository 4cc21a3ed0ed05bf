"""Old import path of the pyfunc model (registered models before the package layout load it): re-exports
`crosspt.registry.pyfunc`."""
from crosspt.registry.pyfunc import *  # noqa: F401,F403
from crosspt.registry.pyfunc import CrossPTPyfunc, CrossPTPredictor  # noqa: F401
