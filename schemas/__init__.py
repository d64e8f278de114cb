"""Arrow schemas and validation for every table that crosses a stage boundary."""
from schemas.tables import (GENERATIONS, PAIRS, PROMPTS, RANKED_LISTS, SCHEMAS, STATUS_VALUES, TREE_NODE,
                            TREES, UNIQUE_KEY, schema_for)
from schemas.errors import BackendError, InputError, PrefpipeError
from schemas.validate import conform, validate

__all__ = ["GENERATIONS", "PAIRS", "PROMPTS", "RANKED_LISTS", "SCHEMAS", "STATUS_VALUES", "TREE_NODE", "TREES",
           "UNIQUE_KEY", "schema_for", "conform", "validate"]
