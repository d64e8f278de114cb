"""Every stage module of the package, imported plainly (each registers its stage on import), plus the user's
own stage modules named in PREFPIPE_STAGE_MODULES (comma-separated module paths)."""
from __future__ import annotations

import importlib
import os

from stages import (deliberation, generate, intervention, mine_trees, rationales,  # noqa: F401
                    reward_relabel, sample_pairs, select, self_label, tree_search)


def load_stage_modules() -> None:
    """Import the user's stage modules; an import error in one of them is raised, never skipped."""
    for name in os.environ.get("PREFPIPE_STAGE_MODULES", "").split(","):
        if name.strip():
            importlib.import_module(name.strip())
