"""Error types (defined in `schemas.errors`, the bottom layer, so every layer can raise them)."""
from schemas.errors import BackendError, InputError, PrefpipeError

__all__ = ["BackendError", "InputError", "PrefpipeError"]
