"""The report's opening: what the run found, in three plain sentences with numbers and intervals.

The treatment is the first training arm with role `treatment`; it is compared with the base model, with the
first `baseline` arm and with the first `control` arm, each by the report's paired difference over the same eval
problems. summary.json keeps the three comparisons under `headline` (`vs base`, `vs baseline`, `vs control`) for
scripts (e.g. the README's table).
"""
from __future__ import annotations

from flows.config import RunConfig

MINUS = "\u2212"  # as in the README's tables


def signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", MINUS)


def verdict(d: dict) -> str:
    if d["ci_low_pp"] > 0:
        return "a clear gain"
    if d["ci_high_pp"] < 0:
        return "a clear loss"
    return "no clear difference (the interval includes zero)"


def _first(cfg: RunConfig, role: str, evals: dict) -> str | None:
    return next((a.name for a in cfg.train if a.role == role and a.name in evals), None)


def _steps(summary: dict, a: str, b: str) -> str:
    sa, sb = (summary["train"].get(x, {}).get("steps") for x in (a, b))
    if not sa or not sb:
        return ""
    return f", the same {sa} steps" if sa == sb else f", {sb} steps against {sa}"


def headline(cfg: RunConfig, summary: dict) -> dict:
    """{treatment, comparisons: {"vs base" | "vs baseline" | "vs control": {reference, delta_pp, ci_low_pp,
    ci_high_pp, n}}, sentences: [three strings]} from a summary with `evals`, `deltas` and `train`."""
    evals = summary["evals"]
    t = _first(cfg, "treatment", evals)
    out = {"treatment": t, "comparisons": {}, "sentences": []}
    if t is None or "base" not in evals:
        out["sentences"] = [
            "No treatment arm and base model of this run have both been evaluated yet, so there is no result.",
            "The comparison with a baseline arm needs those evals too.",
            "The comparison with a control arm needs those evals too."]
        return out
    refs = {"vs base": "base", "vs baseline": _first(cfg, "baseline", evals),
            "vs control": _first(cfg, "control", evals)}
    for key, ref in refs.items():
        d = summary["deltas"].get(f"{t} vs {ref}") if ref else None
        if d:
            out["comparisons"][key] = {"reference": ref, **d}
    acc = {k: f"{100 * e['accuracy']:.1f} %" for k, e in evals.items()}
    b = out["comparisons"]["vs base"]
    s = [f"The treatment `{t}` answered {acc[t]} of {evals[t]['n']:,} eval problems against {acc['base']} for "
         f"the base model: {_delta(b)}, {verdict(b)}."]
    for key, role in (("vs baseline", "baseline"), ("vs control", "control")):
        d = out["comparisons"].get(key)
        if d is None:
            s.append(f"This run has no evaluated {role} arm to compare `{t}` with.")
        else:
            ref = d["reference"]
            s.append(f"Against the {role} `{ref}` ({acc[ref]}{_steps(summary, t, ref)}) it is {_delta(d)}, "
                     f"{verdict(d)}.")
    out["sentences"] = s
    return out


def _delta(d: dict) -> str:
    return (f"{signed(d['delta_pp'])} points (95 % CI {signed(d['ci_low_pp'])} to "
            f"{signed(d['ci_high_pp'])})")
