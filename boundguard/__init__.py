"""boundguard: catch bounded-output bugs while your model trains.

The top level holds the framework-free core types only; the callbacks live in
``boundguard.integrations.lightning`` / ``.pytorch_lightning`` / ``.keras`` and ``watch`` in
``boundguard.integrations.torch``. Importing ``boundguard`` imports no framework.
"""
from boundguard.alerts import Alert, BoundGuardError, BoundGuardWarning
from boundguard.bounds import Bounds

__all__ = ["Alert", "BoundGuardError", "BoundGuardWarning", "Bounds", "__version__"]

__version__ = "0.1.0"
