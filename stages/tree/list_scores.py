"""TPO list scores from a judge or a reward model (`list_score`), stored on the tree so mining stays model-free.

TPO ranks a list of responses to one prompt by a preference score. With `list_score: verifier` mining grades
each terminal response with the task (stages/tree/mining.py, graded_score). With `judge` or `reward_model` the
search scores every distinct terminal response of every tree once, in ONE batched call for the shard:

- judge: a pointwise score on `list_rubric` on the declared integer `list_scale` (pipeline/judges: votes on a
  chat-only server, the expected score under the answer probabilities with log-probs);
- reward_model: σ(score) of the `value_model` folder, on [0, 1], the scale a Bradley-Terry model is trained on.

Each tree's `info` keeps `list_scores` {node_id: score}, `list_scale` [low, high] (the lists' declared
score_min/score_max, which the TPO loss maps its labels from), `list_scorer` (kind, model, template) and, for a
judge, `list_raw` {node_id: raw answer} and `list_errors` {node_id: error}: a response whose judge answer does
not parse gets no score and is left out of its list, never given a default.
"""
from __future__ import annotations

import math

from stages.tree.config import SearchConfig
from stages.tree.expand import Work


def terminal_responses(w: Work) -> dict[str, list[str]]:
    """Response text -> the ids of the terminal nodes that end in it (one score per distinct response)."""
    out: dict[str, list[str]] = {}
    for n in w.tree.nodes.values():
        if n.is_terminal:
            out.setdefault(w.tree.response(n), []).append(n.node_id)
    return out


def score_lists(works: list[Work], backend, cfg: SearchConfig) -> None:
    """Score every distinct terminal response of every tree in one call and store the scores on the trees."""
    items = [(w, text, ids) for w in works for text, ids in terminal_responses(w).items()]
    if not items:
        return
    pairs = [(w.tree.prompt, text) for w, text, _ in items]
    raws: list[str | None] = [None] * len(items)
    errors: list[str | None] = [None] * len(items)
    if cfg.list_score == "reward_model":
        from pipeline.judges.reward_model import load_scorer  # torch + transformers only when used

        scorer = load_scorer(cfg.value_model)
        raw = scorer.score([p for p, _ in pairs], [t for _, t in pairs])
        values: list[float | None] = [0.5 * (1.0 + math.tanh(s / 2)) for s in raw]  # σ, without exp's overflow
        scale, scorer_info = (0.0, 1.0), {"kind": "reward_model", "model": scorer.model_id}
    else:
        from pipeline.judges.config import JudgeConfig, open_judge

        verdicts = open_judge(cfg.judge or JudgeConfig(), backend).score(pairs, cfg.list_rubric, cfg.list_scale)
        values = [v.value for v in verdicts]
        raws, errors = [v.raw for v in verdicts], [v.error for v in verdicts]
        scale = tuple(float(x) for x in cfg.list_scale)
        scorer_info = {"kind": "judge", "model": verdicts[0].model, "template": verdicts[0].template}
    for w in works:
        w.tree.info.update(list_scores={}, list_scale=list(scale), list_scorer=scorer_info)
        if cfg.list_score == "judge":
            w.tree.info.update(list_raw={}, list_errors={})
    for (w, _, ids), value, raw, error in zip(items, values, raws, errors):
        for node_id in ids:
            if value is not None:
                w.tree.info["list_scores"][node_id] = value
            if cfg.list_score == "judge":
                w.tree.info["list_raw"][node_id] = raw
                if error:
                    w.tree.info["list_errors"][node_id] = error
