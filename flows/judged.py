"""Judged stages in the run report (docs/judges.md): which judge (or reward model) a stage asked, how many of its
input items it kept, why it dropped the rest, and, where the run's inputs have gold, how often its labels agree
with it.

- keep rate: kept items / items. An item is an output row, or, for reward-relabel, one input pair (its two
  relabeled rows share `source_pair_id`); kept = status ok.
- reasons: the error category ("argues_neither", "judge_error", ...) of every item not kept.
- gold: on ok full-solution pairs (relabel: the unflipped row, whose label is the judge's own order), whether
  the chosen side is right and the rejected side wrong by the task's check (pipeline/agreement.py); TPO lists
  scored by a model: the share of response pairs the verifier orders that the model orders the same way.
- two harm judges (intervention): their mean agreement (`extra.harm_agreement`).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import pyarrow as pa

from stages._judge import error_category


def judges_of(stage: str, c: dict) -> list[str]:
    """The judges a stage step asks, as a reader would name them ([] when the step asks none): the stage config's
    own `judges()`."""
    from pipeline.stage import get_stage
    from stages.catalog import load_stage_modules

    load_stage_modules()
    return get_stage(stage).config(**c).judges()


def keep_stats(table: pa.Table) -> dict:
    """Items, kept, keep_rate and the error categories of the items not kept."""
    rows = table.select([c for c in ("status", "error", "source_pair_id") if c in table.column_names]).to_pylist()
    items: dict[object, list[dict]] = {}
    for i, r in enumerate(rows):
        items.setdefault(r.get("source_pair_id") or i, []).append(r)
    kept = [any(r["status"] == "ok" for r in group) for group in items.values()]
    reasons = Counter(error_category(group[0].get("error")) or str(group[0]["status"])
                      for group, k in zip(items.values(), kept) if not k)
    n = len(items)
    return {"items": n, "kept": sum(kept), "keep_rate": sum(kept) / n if n else None, "reasons": dict(reasons)}


def full_solution_pairs(table: pa.Table) -> pa.Table:
    """Ok pairs whose sides are whole responses, with the judge's own label order (not relabel's flipped rows)."""
    keep = [r["status"] == "ok" and not r.get("flipped") and r.get("chosen_is_terminal") is not False
            and r.get("rejected_is_terminal") is not False
            for r in table.select([c for c in ("status", "flipped", "chosen_is_terminal", "rejected_is_terminal")
                                   if c in table.column_names]).to_pylist()]
    table = table.filter(pa.array(keep, pa.bool_()))
    if "shared_prefix" not in table.column_names:  # stages whose pairs have no step group
        table = table.append_column("shared_prefix", pa.nulls(table.num_rows, pa.string()))
    return table


def list_order_agreement(lists: pa.Table) -> dict | None:
    """Model-scored TPO lists: of the response pairs the verifier grades differently, how many the model's scores
    order the same way (a model tie counts as not agreeing)."""
    agree = n = 0
    for scores, extra in zip(lists["scores"].to_pylist(), lists["extra"].to_pylist()):
        gold = json.loads(extra or "{}").get("verifier_scores")
        if not gold:
            continue
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                if gold[i] != gold[j]:
                    n += 1
                    agree += (scores[i] - scores[j]) * (gold[i] - gold[j]) > 0
    return {"pairs": n, "agree": agree, "agree_share": agree / n} if n else None


def harm_agreement(table: pa.Table) -> float | None:
    values = [json.loads(x or "{}").get("harm_agreement") for x in table["extra"].to_pylist()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def judged_info(stage: str, config: dict, read: Callable[..., pa.Table], outputs: dict,
                gold: Callable[[pa.Table], dict | None]) -> dict | None:
    """The report's entry of one stage step (None when it asks no judge). `read(output)` reads a stage output;
    `gold(pairs)` is the label agreement with the run's task gold (None without gold)."""
    judges = judges_of(stage, config)
    if not judges:
        return None
    main = read("main")
    info = {"judges": judges, **keep_stats(main)}
    if outputs.get("main") == "pairs" and stage != "tree-search":
        info["gold"] = gold(full_solution_pairs(main))
    if "lists" in outputs and config.get("list_score") in ("judge", "reward_model"):
        info["lists_gold"] = list_order_agreement(read("lists"))
    if stage == "intervention" and "extra" in main.column_names:
        info["harm_agreement"] = harm_agreement(main)
    return info


def judged_lines(stages: dict) -> list[str]:
    """The report's markdown section on judged stages."""
    rows = [(k, v["judged"]) for k, v in stages.items() if v.get("judged")]
    if not rows:
        return []
    lines = ["## Judged stages", "", "Keep rate: input items kept (status ok); gold: on ok whole-response pairs, the "
             "label agrees with the task's answer check (chosen right, rejected wrong), where the inputs have gold.",
             "", "| stage | judges | kept | keep rate | dropped because | agreement |", "|---|---|---|---|---|---|"]
    for k, j in rows:
        agreement = []
        if j.get("gold"):
            agreement.append(f"gold {j['gold']['agree']}/{j['gold']['n']}")
        if j.get("lists_gold"):
            agreement.append(f"list order vs verifier {j['lists_gold']['agree']}/{j['lists_gold']['pairs']}")
        if j.get("harm_agreement") is not None:
            agreement.append(f"two harm judges {100 * j['harm_agreement']:.0f} %")
        rate = "–" if j["keep_rate"] is None else f"{100 * j['keep_rate']:.0f} %"
        reasons = ", ".join(f"{r} {c}" for r, c in sorted(j["reasons"].items(), key=lambda t: -t[1]))
        lines.append(f"| {k} | {'; '.join(j['judges'])} | {j['kept']}/{j['items']} | {rate} | {reasons or '–'} | "
                     f"{', '.join(agreement) or 'no gold'} |")
    return lines + [""]
