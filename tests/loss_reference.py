"""Independent float64 reference of the preference losses, written from the formulas of the papers docs/trainer.md lists
(TRL's losses, the seed papers) with plain Python `math` over lists (no torch), plus central finite differences for
gradients. Quantities the real losses compute without gradient (WPO weights, BCO baseline, SPA confidence,
LCPO posteriors, lambda ranks) are computed once at the unperturbed point ("frozen") and held fixed while
differencing, which is exactly what detaching means.
"""
from __future__ import annotations

import math
from collections.abc import Callable

LN2 = math.log(2.0)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def fdiv(delta: float, kind: str, alpha: float) -> float:
    """f'(e^Δ) of the f-divergence, normalised so that it is 0 at Δ = 0 (TRL 1.16)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and alpha == 1.0):
        return delta
    if kind == "forward_kl":
        return 1.0 - math.exp(-delta)
    if kind == "js_divergence":
        return math.log(2.0 * math.exp(delta) / (math.exp(delta) + 1.0))
    return (math.exp((alpha - 1.0) * delta) - 1.0) / (alpha - 1.0)


def ld_sum(tokens: list[float], n: int, shared: int, alpha: float) -> float:
    total = 0.0
    for t in range(n):
        total += tokens[t] * (1.0 if t < shared else alpha)
    return total


DEFAULTS = dict(beta=0.1, eps=0.0, f="reverse_kl", f_alpha=0.5, tau=0.05, gamma=0.5, ln_beta=1.0,
                reference_free=False, types=("sigmoid",), weights=None, rpo_alpha=None, rpo_form="average",
                nll_average="token", ld_alpha=None, wpo=False, wpo_clamp=False, bco_prev=(0.0, 0),
                bco_baseline=True, spa_tau=0.0, spa_alpha=0.1, rationale_gamma=None,
                rationale_form="logsigmoid", lcpo=None, lcpo_noise=0.1, use_confidence=False)


def _pair_values(x: dict, c: dict) -> list[dict]:
    """Per pair: summed logps after LD-DPO / reference-free, tokens, Δ and s(Δ)."""
    out = []
    for i in range(len(x["pc"])):
        ct, rt = x["ct"][i], x["rt"][i]
        pc, pr = x["pc"][i], x["pr"][i]
        rc = 0.0 if c["reference_free"] or x.get("rc") is None else x["rc"][i]
        rr = 0.0 if c["reference_free"] or x.get("rr") is None else x["rr"][i]
        if c["ld_alpha"] is not None:
            shared = int(min(ct, rt))
            pc = ld_sum(x["pc_tok"][i], int(ct), shared, c["ld_alpha"])
            pr = ld_sum(x["pr_tok"][i], int(rt), shared, c["ld_alpha"])
            if not c["reference_free"] and x.get("rc_tok") is not None:
                rc = ld_sum(x["rc_tok"][i], int(ct), shared, c["ld_alpha"])
                rr = ld_sum(x["rr_tok"][i], int(rt), shared, c["ld_alpha"])
        dc, dr = pc - rc, pr - rr
        out.append(dict(pc=pc, pr=pr, rc=rc, rr=rr, ct=ct, rt=rt, dc=dc, dr=dr,
                        sc=fdiv(dc, c["f"], c["f_alpha"]), sr=fdiv(dr, c["f"], c["f_alpha"])))
    return out


def _smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def single_pair(name: str, p: dict, c: dict, eps: float) -> float:
    """The per-pair value of a pair-local loss type (not aot/bco/distill/sft)."""
    b = c["beta"]
    d = p["sc"] - p["sr"]
    if name == "sigmoid":
        return _smoothed(b * d, eps)
    if name == "hinge":
        return max(0.0, 1 - b * d)
    if name == "ipo":
        return (p["sc"] / p["ct"] - p["sr"] / p["rt"] - 1 / (2 * b)) ** 2
    if name == "exo_pair":
        e = c["eps"] or 1e-3
        z = b * d
        return sigmoid(z) * (log_sigmoid(z) - math.log(1 - e)) + sigmoid(-z) * (log_sigmoid(-z) - math.log(e))
    if name == "nca_pair":
        return -log_sigmoid(b * p["dc"]) - 0.5 * log_sigmoid(-b * p["dc"]) - 0.5 * log_sigmoid(-b * p["dr"])
    if name == "robust":
        e = c["eps"]
        return (-(1 - e) * log_sigmoid(b * d) + e * log_sigmoid(-b * d)) / (1 - 2 * e)
    if name == "sppo_hard":
        return (p["dc"] - 1 / (2 * b)) ** 2 + (p["dr"] + 1 / (2 * b)) ** 2
    if name == "apo_zero":
        return 1 - sigmoid(b * p["dc"]) + sigmoid(b * p["dr"])
    if name == "apo_down":
        return sigmoid(b * p["dc"]) + 1 - sigmoid(b * d)
    if name == "discopop":
        z = b * d
        mod = sigmoid(z / c["tau"])
        return (1 - mod) * -log_sigmoid(z) + mod * math.exp(-z)
    if name == "sigmoid_norm":
        return -log_sigmoid(b * (p["sc"] / p["ct"] - p["sr"] / p["rt"]))
    if name == "ln_dpo":
        return -log_sigmoid(c["ln_beta"] * (p["sc"] / p["ct"] - p["sr"] / p["rt"]))
    if name == "simpo":
        return _smoothed(b * (p["pc"] / p["ct"] - p["pr"] / p["rt"]) - c["gamma"], c["eps"])
    if name == "orpo":
        lc, lr = p["pc"] / p["ct"], p["pr"] / p["rt"]
        odds = (lc - lr) - (math.log(1 - math.exp(lc)) - math.log(1 - math.exp(lr)))
        return -b * log_sigmoid(odds)
    raise KeyError(name)


def _flip(p: dict) -> dict:
    return dict(pc=p["pr"], pr=p["pc"], rc=p["rr"], rr=p["rc"], ct=p["rt"], rt=p["ct"], dc=p["dr"], dr=p["dc"],
                sc=p["sr"], sr=p["sc"])


def freeze(x: dict, cfg: dict) -> dict:
    """The no-gradient quantities at the given point."""
    c = {**DEFAULTS, **cfg}
    pairs = _pair_values(x, c)
    b = c["beta"]
    frozen: dict = {}
    if "bco_pair" in c["types"]:
        rewards = [b * p["dc"] for p in pairs] + [b * p["dr"] for p in pairs]
        total, count = c["bco_prev"]
        frozen["bco_delta"] = (total + sum(rewards) / len(rewards)) / (count + 1) if c["bco_baseline"] else 0.0
    if "distill" in c["types"]:
        margins = x.get("z") or [b * (p["sc"] - p["sr"]) for p in pairs]
        frozen["confident"] = [1.0 if z > c["spa_tau"] else 0.0 for z in margins]
    if c["wpo"]:
        ws = []
        for i in range(len(pairs)):
            w = math.exp((x["pc"][i] - x["sq_c"][i]) / x["ct"][i] + (x["pr"][i] - x["sq_r"][i]) / x["rt"][i])
            ws.append(min(w, 1.0) if c["wpo_clamp"] else w)
        frozen["wpo"] = ws
    if c["lcpo"]:
        e = c["lcpo_noise"]
        post = {}
        for name in c["types"]:
            post[name] = []
            for p in pairs:
                prob = sigmoid(single_pair(name, _flip(p), c, c["eps"]) - single_pair(name, p, c, c["eps"]))
                post[name].append((1 - e) * prob / ((1 - e) * prob + e * (1 - prob)))
        frozen["lcpo"] = post
    return frozen


def _type_losses(name: str, pairs: list[dict], x: dict, c: dict, frozen: dict) -> list[float]:
    b = c["beta"]
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            left = sorted(p["pc"] - p["pr"] for p in pairs)
            right = sorted(p["rc"] - p["rr"] for p in pairs)
        else:
            left = sorted(p["dc"] for p in pairs)
            right = sorted(p["dr"] for p in pairs)
        return [_smoothed(b * (u - v), c["eps"]) for u, v in zip(left, right)]
    if name == "bco_pair":
        delta = frozen["bco_delta"]
        return [-log_sigmoid(b * p["dc"] - delta) - log_sigmoid(-(b * p["dr"] - delta)) for p in pairs]
    if name == "distill":
        a = c["spa_alpha"]
        out = []
        for p, conf in zip(pairs, frozen["confident"]):
            h = b * (p["sc"] - p["sr"])
            out.append(-(1 - a + a * conf) * log_sigmoid(h) - a * (1 - conf) * log_sigmoid(-h))
        return out
    if name == "sft":
        return [0.0 for _ in pairs]
    out = []
    for i, p in enumerate(pairs):
        eps = 1 - x["conf"][i] if c["use_confidence"] else c["eps"]
        value = single_pair(name, p, c, eps)
        if c["lcpo"]:
            w = frozen["lcpo"][name][i]
            flipped = single_pair(name, _flip(p), c, eps)
            value = w * value + (1 - w) * flipped if c["lcpo"] == "em_full" else w * value
        out.append(value)
    return out


def pair_loss_ref(x: dict, cfg: dict, frozen: dict | None = None, n_items: float | None = None,
                  n_tokens: float | None = None) -> float:
    """Mean loss of a PairBatch given as lists: keys pc, pr, rc, rr, ct, rt (+ pc_tok.. for LD-DPO, sq_c/sq_r
    for WPO, w for pair weights, conf, z, rat for the rationale logps)."""
    c = {**DEFAULTS, **cfg}
    if frozen is None:
        frozen = freeze(x, cfg)
    pairs = _pair_values(x, c)
    n = len(pairs)
    n_items = n if n_items is None else n_items
    weights = c["weights"] or [1.0] * len(c["types"])
    pref = [0.0] * n
    for name, w in zip(c["types"], weights):
        for i, v in enumerate(_type_losses(name, pairs, x, c, frozen)):
            pref[i] += w * v
    for i in range(n):
        if x.get("w") is not None:
            pref[i] *= x["w"][i]
        if c["wpo"]:
            pref[i] *= frozen["wpo"][i]
    total = sum(pref)
    nll = [-x["pc"][i] for i in range(n)]
    if c["rpo_alpha"] is not None and c["rpo_form"] == "cumulative":
        total += sum(c["rpo_alpha"] * c["beta"] * v for v in nll)
    if c["rationale_gamma"] is not None:
        g = c["rationale_gamma"]
        for r in x["rat"]:
            total += -log_sigmoid(g * r) if c["rationale_form"] == "logsigmoid" else -g * r
    coef = sum(w for name, w in zip(c["types"], weights) if name in ("sft", "orpo"))
    if c["rpo_alpha"] is not None and c["rpo_form"] == "average":
        coef += c["rpo_alpha"]
    loss = total / n_items
    if coef:
        if c["nll_average"] == "sequence":
            loss += coef * sum(v / x["ct"][i] for i, v in enumerate(nll)) / n_items
        else:
            loss += coef * sum(nll) / (sum(x["ct"]) if n_tokens is None else n_tokens)
    return loss


# ---------------------------------------------------------------- list losses

def _order_by_label(scores: list[float], mask: list[bool]) -> list[int]:
    valid = [i for i in range(len(scores)) if mask[i]]
    return sorted(valid, key=lambda i: (-scores[i], i))


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _lambda_list(r: list[float], labels: list[float], mask: list[bool], weighting: str, base: float) -> float:
    valid = [i for i in range(len(r)) if mask[i]]
    by_model = sorted(valid, key=lambda i: (-r[i], i))
    rank = {i: k + 1 for k, i in enumerate(by_model)}
    loss = 0.0
    for i in valid:
        for j in valid:
            if labels[i] > labels[j]:
                if weighting == "lambda":
                    gain = abs((2 ** labels[i] - 1) - (2 ** labels[j] - 1))
                    disc = abs(1 / math.log(1 + rank[i], base) - 1 / math.log(1 + rank[j], base))
                    weight = gain * disc
                else:
                    weight = 1.0
                loss += -weight * log_sigmoid(r[i] - r[j])
    return loss


LIST_DEFAULTS = dict(beta=0.1, reference_free=False, length_normalize=False, weighting="lambda", base=2.0,
                     temperature=True, sft=0.05, label_range=(-100.0, 100.0))


def list_loss_ref(x: dict, cfg: dict) -> float:
    """x: lists of lists pol, ref (or None), tok, score, mask, optional s (TPO response scores)."""
    c = {**LIST_DEFAULTS, **cfg}
    kind = c["type"]
    per_list = []
    for b in range(len(x["pol"])):
        pol, tok, score, mask = x["pol"][b], x["tok"][b], x["score"][b], x["mask"][b]
        ref = x["ref"][b] if x.get("ref") is not None and not c["reference_free"] else [0.0] * len(pol)
        if kind == "pro":
            order = _order_by_label(score, mask)
            s = [pol[i] / tok[i] for i in order]
            rw = [score[i] for i in order]
            n = len(order)
            loss = 0.0
            for k in range(n - 1):
                temps = [rw[k] - rw[i] if c["temperature"] else 1.0 for i in range(k + 1, n)]
                own = max(temps) if c["temperature"] else 1.0
                logits = [s[k] * own] + [s[i] * t for i, t in zip(range(k + 1, n), temps)]
                loss += _lse(logits) - logits[0]
            per_list.append(loss + c["sft"] * (n - 1) ** 2 * -pol[order[0]])
            continue
        ratio = [pol[i] - ref[i] for i in range(len(pol))]
        if kind == "tpo":
            s = x["s"][b] if x.get("s") is not None else [ratio[i] / tok[i] for i in range(len(pol))]
            lo, hi = c["label_range"]
            labels = [(v - lo) / (hi - lo) for v in score]
            per_list.append(_lambda_list([c["beta"] * v for v in s], labels, mask, c["weighting"], c["base"]))
            continue
        if c["length_normalize"]:
            ratio = [ratio[i] / tok[i] for i in range(len(pol))]
        r = [c["beta"] * v for v in ratio]
        if kind == "plackett_luce":
            order = _order_by_label(score, mask)
            per_list.append(sum(_lse([r[j] for j in order[k:]]) - r[order[k]] for k in range(len(order))))
        else:
            per_list.append(_lambda_list(r, score, mask, c["weighting"], c["base"]))
    return sum(per_list) / len(per_list)


# ---------------------------------------------------------------- gradients

def fd_grad(f: Callable[[dict], float], x: dict, key: str, h: float = 1e-5) -> list:
    """Central differences of f w.r.t. every entry of x[key] (a list, or a list of lists)."""
    def perturbed(path: tuple[int, ...], delta: float) -> float:
        y = {k: ([list(r) for r in v] if isinstance(v, list) and v and isinstance(v[0], list) else
                 (list(v) if isinstance(v, list) else v)) for k, v in x.items()}
        target = y[key]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] += delta
        return f(y)

    value = x[key]
    if value and isinstance(value[0], list):
        return [[(perturbed((i, j), h) - perturbed((i, j), -h)) / (2 * h) for j in range(len(row))]
                for i, row in enumerate(value)]
    return [(perturbed((i,), h) - perturbed((i,), -h)) / (2 * h) for i in range(len(value))]
