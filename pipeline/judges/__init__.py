"""LLM judges every stage shares (docs/judges.md): pointwise scores on a declared scale, pairwise preference
asked in both orders, step correctness given the prefix, yes/no with a probability. Import the modules
themselves (pipeline.judges.judge, .config); this file stays free of imports."""
