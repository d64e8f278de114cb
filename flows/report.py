"""The run report: what the data did to the model, next to the controls.

Writes <output_dir>/report/{report.md, summary.json, accuracy.png, margins.png, training.png}. Accuracy comes
with 95 % Wilson intervals; every trained arm's change against the base model (and against each control arm)
comes with a paired bootstrap 95 % interval over the same eval problems.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flows.config import RunConfig
from flows.headline import headline
from flows.intervals import paired_delta
from flows.judged import judged_info, judged_lines, judges_of
from flows.paths import model_labels, run_dir
from pipeline.agreement import label_agreement
from pipeline.store import RunStore, atomic_write_bytes
from schemas.errors import InputError
from stages.tree.quality import quality_report


def _load_evals(cfg: RunConfig) -> dict[str, dict]:
    out = {}
    for label, _ in model_labels(cfg):
        p = run_dir(cfg) / "eval" / f"{label}.json"
        if p.exists():
            out[label] = json.loads(p.read_text())
    return out


def _load_external(cfg: RunConfig, evals: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """`eval.compare_with`: evals of other runs. Paired comparisons need the same problems, so each file's
    problem ids must equal this run's base eval's (or, without one, those of any eval of this run). Files that
    do not exist yet are returned as missing (the report lists them); unreadable or mismatched ones are errors.
    Returns (label -> eval, label -> missing path)."""
    ext = (cfg.eval.compare_with if cfg.eval else {}) or {}
    out: dict[str, dict] = {}
    missing: dict[str, str] = {}
    if not ext:
        return out, missing
    own = evals.get("base") or next(iter(evals.values()), None)
    want = set(_correct_by_id(own)) if own else None
    for label, path in ext.items():
        if label in evals:
            raise InputError(f"compare_with label {label!r} is also an arm of this run", column="eval.compare_with")
        p = Path(path)
        if not p.exists():  # the other run has not evaluated that arm yet: the report says so, no comparison
            missing[label] = str(p)
            continue
        try:
            ev = json.loads(p.read_text())
            got = set(_correct_by_id(ev))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"not a prefpipe eval file ({type(e).__name__}: {e})", file=str(p)) from None
        if want is not None and got != want:
            raise InputError(f"its {len(got)} problems are not this run's {len(want)} eval problems "
                             f"({len(got - want)} not in this run); a paired comparison needs the same problems",
                             file=str(p), column="per_problem")
        out[label] = ev
    return out, missing


def _correct_by_id(ev: dict) -> dict[str, bool]:
    return {r["id"]: r["correct"] for r in ev["per_problem"]}


def _delta_by_id(cfg: RunConfig, ref: dict[str, float], got: dict[str, float]) -> dict:
    """paired_delta of `got` against `ref` (problem id -> correctness) on the problems both have."""
    ids = [i for i in ref if i in got]
    return paired_delta([ref[i] for i in ids], [got[i] for i in ids],
                        resamples=cfg.eval.bootstrap if cfg.eval else 2000)


def _metrics(cfg: RunConfig, arm: str) -> list[dict]:
    p = run_dir(cfg) / "train" / arm / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _stage_stats(cfg: RunConfig) -> dict[str, dict]:
    store = RunStore(run_dir(cfg))
    stats, problems = {}, None
    for s in cfg.stages:
        st = store.stage(s.folder)
        if not st.exists():
            continue
        m = st.manifest()
        info = {"stage": s.stage, "complete": m["complete"], "rows": {o: st.num_rows(o) for o in m["outputs"]},
                "status": (m.get("summary") or {}).get("status", {})}
        if m["outputs"].get("main") == "pairs" and st.num_rows():
            t = st.read(columns=["score_margin", "status", "method"])
            ok = [s == "ok" for s in t.column("status").to_pylist()]
            margins = [v for v, k in zip(t.column("score_margin").to_pylist(), ok) if k and v is not None]
            methods = t.column("method").to_pylist()
            info["margins"] = margins
            info["methods"] = {k: methods.count(k) for k in sorted(set(map(str, methods)))}
        if "trees" in m["outputs"] and st.num_rows("trees"):
            info["tree_arrays"] = _tree_arrays(st.read("trees"))
            info["trees"] = _tree_stats(info["tree_arrays"])
        if "trees" in m["outputs"] and info.get("margins") is not None and st.num_rows("trees"):
            # the pairs re-verified from their texts against the stored trees' tasks (stages/tree/quality.py)
            info["quality"] = quality_report(st.read(), st.read("trees"))
        if s.stage in FULL_SOLUTION_STAGES and info.get("margins") is not None:
            problems = _task_problems(cfg) if problems is None else problems
            agreement = problems and _verifier_agreement(problems, st.read(columns=list(AGREEMENT_COLUMNS)))
            if agreement:
                info["verifier"] = agreement
        if judges_of(s.stage, s.config):  # keep rate, drop reasons and gold agreement (flows/judged.py)
            problems = _task_problems(cfg) if problems is None else problems
            info["judged"] = judged_info(s.stage, s.config, st.read, m["outputs"],
                                         lambda t, p=problems: _verifier_agreement(p, t) if p else None)
        stats[s.folder] = info
    return stats


# Stages whose pairs hold whole solutions (shared_prefix + chosen is a full answer), so the task's answer
# check can say whether the label is right. Tree step pairs hold one line and are step-verified already.
FULL_SOLUTION_STAGES = {"sample-pairs", "intervention", "self-label"}


AGREEMENT_COLUMNS = ("prompt_id", "shared_prefix", "chosen", "rejected", "status")


def _task_problems(cfg: RunConfig) -> dict:
    """prompt_id -> the input row bound to its task (pipeline/tasks), for every input row with gold to check
    against ({} when the inputs have none, e.g. open prompts)."""
    import pyarrow.parquet as pq

    from pipeline.tasks.registry import item_for_row

    inputs = run_dir(cfg) / "inputs" / "prompts.parquet"
    if not inputs.exists():
        return {}
    items = (item_for_row(r) for r in pq.read_table(inputs).to_pylist())
    return {it.row["prompt_id"]: it for it in items if it.has_gold}


def _verifier_agreement(problems: dict, pairs) -> dict | None:
    """On a task with gold: how often an ok pair's chosen side is right and its rejected side wrong (the label
    agrees with the task's check), both right or both wrong (the label carries no answer signal), or the reverse.
    Re-verified from the pair texts, for every full-solution stage alike (self-label's own `chosen_correct`
    columns and stages.self_label.label_report are that stage's view of the same thing)."""
    verdicts = []
    for r in pairs.select(list(AGREEMENT_COLUMNS)).to_pylist():
        problem = problems.get(r["prompt_id"])
        if r["status"] != "ok" or problem is None:
            continue
        prefix = r["shared_prefix"] or ""
        c, j = problem.correct(prefix + r["chosen"]), problem.correct(prefix + r["rejected"])
        verdicts.append((c, j))
    return label_agreement(verdicts)


def _tree_arrays(trees) -> dict:
    """Per-tree numbers of a tree-search stage (what trees.png plots)."""
    nodes = trees.column("nodes").to_pylist()
    terminal = [x for n in nodes for x in n if x["is_terminal"]]
    correct = sum(1 for x in terminal if x.get("correct"))
    return {"nodes": [len(n) for n in nodes], "depths": [max((x["depth"] for x in n), default=0) for n in nodes],
            "terminal_correct": correct, "terminal_wrong": len(terminal) - correct}


def _tree_stats(a: dict) -> dict:
    terminal = a["terminal_correct"] + a["terminal_wrong"]
    return {"trees": len(a["nodes"]), "nodes_mean": float(np.mean(a["nodes"])) if a["nodes"] else 0.0,
            "nodes_max": max(a["nodes"], default=0), "depth_max": max(a["depths"], default=0),
            "terminal_nodes": terminal, "terminal_correct_share": a["terminal_correct"] / terminal if terminal else 0.0}


def _nll_coefs(cfg: RunConfig) -> dict[str, float]:
    """Preference arms -> the weight of the NLL term in their logged loss (RPO's α; ORPO's 1), so the plot can
    show the preference part alone. Arms without a preference term (NLL/SFT controls) are left out."""
    from pipeline.train.losses import LossConfig
    from pipeline.train.losses.pairwise import NLL_COEF

    out = {}
    for arm in cfg.train:
        loss = LossConfig(**arm.config.get("loss", {}))
        if arm.config.get("mode") in ("sft", "reward") or set(loss.loss_types) <= {"sft"}:
            continue
        coef = sum(w * NLL_COEF.get(t, 0.0) for t, w in zip(loss.loss_types, loss.weights))
        out[arm.name] = coef + (loss.rpo_alpha or 0.0 if loss.rpo_form == "average" else 0.0)
    return out


def _plots(out: Path, cfg: RunConfig, evals: dict, stages: dict) -> list[str]:
    from flows.report_plots import plot_all

    curves = {a.name: _metrics(cfg, a.name) for a in cfg.train}
    return plot_all(out, evals, curves, stages, _nll_coefs(cfg))


def _drift(info: dict) -> dict:
    """Log-prob drift of an arm: the trainer's probe (the same first N training groups scored by the policy
    before and after training, nats per sequence). Empty for runs trained before the probe existed."""
    d = info.get("drift") or {}
    return {k: v for k, v in d.items() if v is not None}


def build_summary(cfg: RunConfig) -> dict:
    evals = _load_evals(cfg)
    external, missing = _load_external(cfg, evals)
    evals.update(external)
    roles = {a.name: a.role for a in cfg.train} | {k: "other run" for k in external}
    summary = {"name": cfg.name, "model": cfg.model, "evals": {}, "deltas": {}, "stages": {}, "train": {},
               "compare_missing": missing}
    for label, ev in evals.items():
        summary["evals"][label] = {k: ev[k] for k in ("accuracy", "ci_low", "ci_high", "n", "correct")}
        summary["evals"][label]["role"] = roles.get(label, "base")
    base = evals.get("base")
    comparators = ["base"] + [a.name for a in cfg.train if a.role in ("control", "baseline")] + list(external)
    for label, ev in evals.items():
        if label == "base" or label in external:
            continue
        for ref in comparators:
            if ref == label or ref not in evals:
                continue
            summary["deltas"][f"{label} vs {ref}"] = _delta_by_id(cfg, _correct_by_id(evals[ref]), _correct_by_id(ev))
    _pools(cfg, evals, summary)
    for arm in cfg.train:
        p = run_dir(cfg) / "train" / arm.name / "train_summary.json"
        info = json.loads(p.read_text()) if p.exists() else {}
        summary["train"][arm.name] = {"role": arm.role, "data": arm.data, "steps": info.get("steps"),
                                      "groups": info.get("groups"), "logp_drift": _drift(info),
                                      "last": info.get("last")}
        if arm.is_reward:  # a verifier: its held-out pairwise ranking instead of an eval on the task
            summary["train"][arm.name]["reward_eval"] = info.get("final_eval")
    del base
    summary["headline"] = headline(cfg, summary)
    return summary


def _pools(cfg: RunConfig, evals: dict[str, dict], summary: dict) -> None:
    """eval.pools: per-problem mean correctness over each pool's models, compared pool by pool (each with every
    earlier pool, and with base). A pool with a model not evaluated yet is listed in `pools_missing`."""
    pools = (cfg.eval.pools if cfg.eval else {}) or {}
    summary["pools"], summary["pool_deltas"], summary["pools_missing"] = {}, {}, {}
    vec: dict[str, dict[str, float]] = {}
    for name, members in pools.items():
        absent = [m for m in members if m not in evals]
        if absent:
            summary["pools_missing"][name] = absent
            continue
        per = [_correct_by_id(evals[m]) for m in members]
        ids = [i for i in per[0] if all(i in p for p in per)]
        vec[name] = {i: sum(p[i] for p in per) / len(per) for i in ids}
        summary["pools"][name] = {"models": members, "accuracy": float(np.mean(list(vec[name].values()))),
                                  "n": len(ids)}
    names = list(vec)
    for j, name in enumerate(names):
        refs = [("base", _correct_by_id(evals["base"]))] if "base" in evals and pools[name] != ["base"] else []
        for ref, rv in refs + [(n, vec[n]) for n in names[:j]]:
            summary["pool_deltas"][f"{name} vs {ref}"] = _delta_by_id(cfg, rv, vec[name])


def write_report(cfg: RunConfig, config_path: Path) -> Path:
    out = run_dir(cfg) / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(cfg)
    stages = _stage_stats(cfg)
    for k, v in stages.items():
        m = v.get("margins") or []
        summary["stages"][k] = {**{kk: vv for kk, vv in v.items() if kk not in ("margins", "tree_arrays")},
                                "margin_mean": float(np.mean(m)) if m else None, "pairs_ok": len(m)}
    evals = _load_evals(cfg)
    plots = _plots(out, cfg, evals, stages)
    md = _markdown(cfg, summary, plots, config_path)
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1, default=float).encode())
    return out


def _delta_row(name: str, d: dict) -> str:
    sig = "yes" if d["ci_low_pp"] > 0 or d["ci_high_pp"] < 0 else "no"
    return f"| {name} | {d['delta_pp']:+.1f} | [{d['ci_low_pp']:+.1f}, {d['ci_high_pp']:+.1f}] | {sig} |"


def _markdown(cfg: RunConfig, s: dict, plots: list[str], config_path: Path) -> str:
    lines = [f"# prefpipe run report: {cfg.name}", "", f"Model: `{cfg.model}`; backend: {cfg.backend}; config: "
             f"`{config_path}`", ""]
    if s.get("headline"):
        lines += ["## What the run found", "", " ".join(s["headline"]["sentences"]), ""]
    if s["evals"]:
        n = next(iter(s["evals"].values()))["n"]
        lines += [f"## Accuracy on {n} eval problems (greedy, 95 % Wilson interval)", "",
                  "| model | role | accuracy | 95 % CI |", "|---|---|---|---|"]
        for label, e in s["evals"].items():
            lines.append(f"| {label} | {e['role']} | {100 * e['accuracy']:.1f} % | "
                         f"[{100 * e['ci_low']:.1f}, {100 * e['ci_high']:.1f}] |")
        if s["deltas"]:
            lines += ["", "### Paired differences (same problems, bootstrap 95 % CI, percentage points)", "",
                      "| comparison | Δ (pp) | 95 % CI | significant |", "|---|---|---|---|"]
            lines += [_delta_row(k, d) for k, d in s["deltas"].items()]
        if s.get("pools"):
            lines += ["", "### Pools (per-problem mean over each pool's models, paired bootstrap 95 % CI)", "",
                      "| pool | models | mean accuracy |", "|---|---|---|"]
            for k, p in s["pools"].items():
                lines.append(f"| {k} | {', '.join(p['models'])} | {100 * p['accuracy']:.1f} % |")
            lines += ["", "| comparison | Δ (pp) | 95 % CI | significant |", "|---|---|---|---|"]
            lines += [_delta_row(k, d) for k, d in s["pool_deltas"].items()]
        for k, absent in (s.get("pools_missing") or {}).items():
            lines.append(f"Pool `{k}` not compared: no eval yet for {', '.join(absent)}.")
        for label, path in (s.get("compare_missing") or {}).items():
            lines.append(f"Not compared with `{label}`: `{path}` does not exist yet (run that config first).")
        lines.append("")
    if s["train"]:
        lines += ["## Training arms", "", "Δ logp: the final model minus the starting policy, summed log-prob per "
                  "sequence (nats), on the same first training groups (`drift_probe`, the count in brackets).", "",
                  "| arm | role | data | steps | pairs/rows | Δ logp chosen | Δ logp rejected |",
                  "|---|---|---|---|---|---|---|"]
        for k, t in s["train"].items():
            if "reward_eval" in t:
                continue
            d = t["logp_drift"] or {}
            chosen, rejected = (f"{d[x]:+.2f} ({d['groups']})" if x in d else "–" for x in ("chosen", "rejected"))
            lines.append(f"| {k} | {t['role']} | {t['data']} | {t['steps']} | {t['groups']} | {chosen} | {rejected} |")
        lines.append("")
        lines += _reward_lines(s["train"])
    if s["stages"]:
        lines += ["## Stages", "", "| stage | rows | status | pairs ok | mean margin | methods |",
                  "|---|---|---|---|---|---|"]
        for k, v in s["stages"].items():
            status = ", ".join(f"{kk}={vv}" for kk, vv in (v.get("status", {}).get("main") or {}).items())
            mm = v.get("margin_mean")
            lines.append(f"| {k} ({v['stage']}) | {v['rows'].get('main')} | {status} | {v.get('pairs_ok', '')} | "
                         f"{'' if mm is None else f'{mm:.3f}'} | {v.get('methods', '')} |")
            if v.get("verifier"):
                a = v["verifier"]
                lines.append(f"|  verifier | label agrees {a['agree']}/{a['n']} ({100 * a['agree_share']:.0f} %) | "
                             f"both right {a['both_right']}, both wrong {a['both_wrong']} | inverted "
                             f"{a['inverted']} | | |")
            if v.get("trees"):
                t = v["trees"]
                lines.append(f"|  trees | {t['trees']} trees | {t['nodes_mean']:.1f} nodes/tree (max "
                             f"{t['nodes_max']}) | depth ≤ {t['depth_max']} | terminal correct "
                             f"{100 * t['terminal_correct_share']:.0f} % | |")
        lines.append("")
        lines += judged_lines(s["stages"])
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def _reward_lines(train: dict) -> list[str]:
    """Reward arms: the trainer's last held-out pairwise accuracy (r(chosen) > r(rejected), ties wrong) and margin."""
    rows = []
    for k, t in train.items():
        if "reward_eval" not in t:
            continue
        e = t["reward_eval"] or {}
        by_type = ", ".join(f"{n} {100 * v['accuracy']:.1f} % of {v['pairs']}"
                            for n, v in (e.get("by_pair_type") or {}).items())
        rows.append(f"| {k} | {t['data']} | {t['steps']} | " + (
            f"{e['pairs']} | {100 * e['accuracy']:.1f} % | {e['margin']:+.3f} | {by_type} |" if e else
            "– | not evaluated | – | |"))
    if not rows:
        return []
    return ["## Reward models (held-out pairs; not evaluated as policies)", "",
            "| arm | data | steps | held-out pairs | pairwise accuracy | mean margin | by pair type |",
            "|---|---|---|---|---|---|---|", *rows, ""]
