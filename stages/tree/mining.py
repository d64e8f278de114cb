"""Pairs and ranked lists from stored trees (docs/stages.md: PRISM, Tree-PLV and TPO pairing), with no model calls.

`mine(trees_table, cfg)` works on any TREES table, so a stored tree can be re-mined with other thresholds.

Step pairs (siblings: the two sides share the parent's response as `shared_prefix`; chosen and rejected are
prefix + ONE step line, never the rest of a sample):
- first_wrong_step (default when the task has a step verifier): siblings under a verified-correct prefix,
  chosen = a verified-correct step, rejected = a wrong step (so it is the first wrong step); with
  `step_rejected: greedy` only the greedy child (`greedy_first`) may be the rejected side. Siblings are
  grouped by prefix text, so equal prefixes reached through different branches pool their steps. With
  `gold_fallback` (re-mining only, the mine-trees stage), a group with a wrong step and no verified sibling takes
  the task's gold next line as the chosen step (a node that is not in the tree: id `<parent>.gold`,
  `extra.chosen_source = "gold"`), kept only when the prefix plus that line verifies. With `chosen_continuation`
  (re-mining only), the chosen side runs on from its step to the verified answer the tree reached below it
  (verified children, the greedy one first): prefix + the right line + the rest of a right solution, the shape of
  the intervention stage's chosen side. A chosen step with no verified terminal below it keeps its one line;
  `extra.chosen_continued` says which.
- prism_sibling: PRISM's ordered pairs with Q_i - Q_j > v_threshold and Q_i >= good_value_threshold among
  children that are terminal or visited >= min_visits.
- value_gap: Tree-PLV, R(chosen) - R(rejected) >= alpha on the [0, 1] success scale.
Terminal pairs: PRISM's terminal mode (right: reward >= good; wrong: reward <= good - v_threshold, on [-1, 1];
with `require_verified`, right also needs the gold answer and every step right, wrong needs a wrong answer),
shuffled, the shorter side tiled min(floor(long/short) + 1, max_gb_ratio) times, zipped.
Lists: the distinct terminal responses ranked by a verifier-graded score (share of the solution that is right
before the first wrong step; answer check or node value without a step verifier), on [0, 1]; or, when the search
scored them with a judge or a reward model (`list_score`, stages/tree/list_scores.py), by those scores on the
scale the tree records (`list_scale`), which the list rows and their (best, worst) pair declare. A list scored by
a model also keeps each response's verifier grade (`verifier_scores` in extra) where the task has gold, so its
agreement with the gold can be measured.
Policies: `tie_policy` drops (or keeps) pairs and lists whose scores are equal; `require_verified` drops any
pair whose chosen does not verify or whose rejected does; duplicates (same pair_id) are dropped with polars.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random

import pyarrow as pa

from schemas.trees import require_trees
from schemas.tables import RANKED_LISTS
from schemas.pairs import make_pairs
from stages._common import now_utc, pair_id
from stages.tree.config import MiningConfig
from stages.tree.nodes import Node, Tree, trees_from_table
from stages.tree.verifier import TreeTask, task_from_info

STEP_TYPES = ("first_wrong_step", "prism_sibling", "value_gap")

# step: every tree pair shares its common prefix as shared_prefix, a side that stops at a mid-solution node is
# non-terminal; pair_type says which rule made it; score_range: the scale of its scores (SCALES).
GROUPS = ("step", "pair_type", "score_range")
PAIR_COLUMNS = [
    pa.field("depth", pa.int16()), pa.field("tree_id", pa.string()),
    pa.field("chosen_node_id", pa.string()), pa.field("rejected_node_id", pa.string()),
    pa.field("chosen_visits", pa.int32()), pa.field("rejected_visits", pa.int32()),
]
# (score_min, score_max) per pair_type: success shares and graded list scores are on [0, 1] (score01,
# graded_score), MCTS Q values and PRISM terminal rewards on [-1, 1] (to_pm1).
SCALES = {"first_wrong_step": (0.0, 1.0), "value_gap": (0.0, 1.0), "list": (0.0, 1.0),
          "prism_sibling": (-1.0, 1.0), "terminal": (-1.0, 1.0)}
LIST_SCALE = (0.0, 1.0)  # graded_score


def to_pm1(node: Node, method: str) -> float:
    """A node's reward on PRISM's [-1, 1] scale (MCTS stores it so; the others store [0, 1])."""
    r = node.reward if node.reward is not None else 0.0
    return r if method == "prism_mcts" else 2.0 * r - 1.0


def score01(node: Node, method: str) -> float:
    """A node's own success score on [0, 1]: its rollout share when it has one, else its reward."""
    if node.rollout_success is not None:
        return node.rollout_success
    return (to_pm1(node, method) + 1.0) / 2.0


def graded_score(tree: Tree, task: TreeTask, node: Node, method: str) -> float:
    """A list score: with a step verifier, the right share of the solution before its first wrong step."""
    if task.has_step_verifier:
        wrong = task.first_wrong_step(tree.response(node))
        return 1.0 if wrong is None else (wrong - 1) / (task.n_steps + 1)
    ok = task.answer_correct(tree.response(node))
    return float(ok) if ok is not None else score01(node, method)


class _Miner:
    def __init__(self, tree: Tree, row: dict, task: TreeTask, cfg: MiningConfig, gold_fallback: bool = False,
                 chosen_continuation: bool = False):
        self.tree, self.row, self.task, self.cfg = tree, row, task, cfg
        self.gold_fallback, self.chosen_continuation = gold_fallback, chosen_continuation
        self.method = tree.method
        self.created_at = now_utc()

    # ---- records --------------------------------------------------------------------------------------------

    def pair(self, kind: str, c: Node, r: Node, sc: float, sr: float, shared: str, extra: dict,
             chosen_end: Node | None = None, scale: tuple[float, float] | None = None) -> dict:
        """A pair record; `chosen_end` (a descendant of `c`) is where the chosen text stops, `c` by default;
        `scale` overrides the kind's score scale (lists scored by a judge)."""
        t = self.tree
        end = chosen_end or c
        chosen, rejected = t.response(end), t.response(r)
        pid = pair_id("tree", t.prompt_id, chosen, rejected)
        return {"pair_id": pid, "prompt_id": t.prompt_id, "prompt": t.prompt, "shared_prefix": shared,
                "chosen": chosen, "rejected": rejected, "stage": "tree", "method": self.method,
                "chosen_score": sc, "rejected_score": sr, "score_margin": sc - sr,
                "score_min": (scale or SCALES[kind])[0], "score_max": (scale or SCALES[kind])[1],
                "generator_model": self.row["generator_model"], "created_at": self.created_at,
                "extra": {"chosen_correct": c.correct, "rejected_correct": r.correct,
                          "chosen_q": c.q_value, "rejected_q": r.q_value, **self.greedy_flags(c, r), **extra},
                "row_key": hashlib.sha256(f"{self.row['row_key']}\0{pid}".encode()).hexdigest(),
                "status": "ok", "error": None, "pair_type": kind, "depth": max(c.depth, r.depth),
                "tree_id": t.tree_id, "chosen_node_id": c.node_id, "rejected_node_id": r.node_id,
                "chosen_is_terminal": end.is_terminal, "rejected_is_terminal": r.is_terminal,
                "chosen_visits": c.visits, "rejected_visits": r.visits}

    @staticmethod
    def greedy_flags(c: Node, r: Node) -> dict:
        """Which side was the greedy step, for trees grown with greedy_first (nothing otherwise)."""
        if c.greedy is None and r.greedy is None:
            return {}
        return {"chosen_greedy": bool(c.greedy), "rejected_greedy": bool(r.greedy)}

    def keep(self, sc: float, sr: float, min_margin: float = 0.0) -> bool:
        if sc == sr:
            return self.cfg.tie_policy == "keep"
        return sc - sr >= min_margin

    def verified(self, c: Node, r: Node) -> bool:
        """require_verified: the chosen side verifies and the rejected side does not, where that is known."""
        if not self.cfg.require_verified:
            return True
        return c.correct is not False and r.correct is not True

    # ---- step pairs -----------------------------------------------------------------------------------------

    def step_mode(self) -> str:
        mode = self.cfg.step_pairs
        if mode != "auto":
            return mode
        if self.task.has_step_verifier:
            return "first_wrong_step"
        return "prism_sibling" if self.method == "prism_mcts" else "value_gap"

    def sibling_groups(self) -> list[tuple[str, list[Node]]]:
        """Children grouped by their shared prefix text (breadth-first order of first appearance)."""
        groups: dict[str, list[Node]] = {}
        for node in sorted(self.tree.nodes.values(), key=lambda n: n.depth):
            if node.children:
                groups.setdefault(self.tree.prefix_text(node), []).extend(self.tree.children(node))
        out = []
        for prefix, kids in groups.items():
            seen, uniq = set(), []
            for k in kids:
                if k.step_text not in seen:
                    seen.add(k.step_text)
                    uniq.append(k)
            out.append((prefix, uniq))
        return out

    def step_ok(self, node: Node) -> bool | None:
        """A node's step label: the task's exact step check where it has one; else (pipeline/tasks/rollouts.py,
        Math-Shepherd's hard estimate) right when a rollout from it reached a right answer, None when it has no
        rollouts (terminal nodes keep their answer check)."""
        if node.correct is not None or self.task.has_step_verifier or node.rollout_success is None:
            return node.correct
        return node.rollout_success > 0

    def first_wrong_step_pairs(self) -> list[dict]:
        out = []
        labels = {} if self.task.has_step_verifier else {"step_label": "rollout"}
        for prefix, kids in self.sibling_groups():
            parent = self.tree.parent(kids[0])
            if parent.parent_id is not None and not self.step_ok(parent):
                continue  # the prefix itself is wrong: the wrong step here is not the first one
            wrong = [k for k in kids if self.step_ok(k) is False and (self.cfg.step_rejected == "any" or k.greedy)]
            right, extra = [k for k in kids if self.step_ok(k)], dict(labels)
            gold = self.gold_child(parent, kids) if not right and wrong and self.gold_fallback else None
            if gold is not None:
                right, extra = [gold], {"chosen_source": "gold"}
            for c, r in itertools.product(right, wrong):
                sc, sr = score01(c, self.method), score01(r, self.method)
                if self.keep(sc, sr, self.cfg.step_min_margin):
                    end, more = c, extra
                    if self.chosen_continuation:
                        end = self.verified_end(c)
                        more = {**extra, "chosen_continued": end is not c,
                                "chosen_end_node_id": end.node_id}
                    out.append(self.pair("first_wrong_step", c, r, sc, sr, prefix, more, end))
        return out

    def verified_end(self, c: Node) -> Node:
        """The verified terminal node reached from `c` through verified children (the greedy child first, then
        the oldest), or `c` itself when that walk stops short of a terminal."""
        node = c
        while not node.is_terminal:
            kids = [k for k in self.tree.children(node) if k.correct]
            if not kids:
                return c
            node = min(kids, key=lambda k: (not k.greedy, [int(p) for p in k.node_id.split(".")]))
        return node if node.correct else c

    def gold_child(self, parent: Node, kids: list[Node]) -> Node | None:
        """The task's gold next line after `parent` (whose children are `kids`) as a node outside the tree, or
        None when there is no step verifier or the prefix plus that line does not verify."""
        if not self.task.has_step_verifier:
            return None
        steps = self.tree.trajectory(parent)
        k = len(self.task.step_lines(self.tree.join.join(steps))) + 1
        line = self.task.gold_line(k)
        terminal = k > self.task.n_steps
        if not self.task.steps_correct(steps + [line], self.tree.join, terminal):
            return None
        greedy = None if kids[0].greedy is None else False  # a greedy_first tree records it on every child
        return Node(f"{parent.node_id}.gold", parent.node_id, parent.depth + 1, line, is_terminal=terminal,
                    reward=1.0, correct=True, greedy=greedy)  # reward 1.0: the top value on both scales

    def valued_sibling_pairs(self, mode: str) -> list[dict]:
        out = []
        for prefix, kids in self.sibling_groups():
            if mode == "prism_sibling":
                kids = [k for k in kids if k.is_terminal or k.visits >= self.cfg.min_visits]
            for c, r in itertools.permutations(kids, 2):
                if mode == "prism_sibling":
                    qc, qr = c.q_value, r.q_value
                    if qc is None or qr is None or not (qc - qr > self.cfg.v_threshold
                                                        and qc >= self.cfg.good_value_threshold):
                        continue
                    sc, sr = qc, qr
                else:
                    sc, sr = score01(c, self.method), score01(r, self.method)
                    if sc - sr < self.cfg.value_gap_alpha:
                        continue
                if self.verified(c, r):
                    out.append(self.pair(mode, c, r, sc, sr, prefix, {}))
        return out

    # ---- terminal pairs and lists ---------------------------------------------------------------------------

    def terminals(self) -> list[Node]:
        seen, out = set(), []
        for n in self.tree.nodes.values():
            text = self.tree.response(n)
            if n.is_terminal and n.reward is not None and text not in seen:
                seen.add(text)
                out.append(n)
        return out

    def common_prefix(self, a: Node, b: Node) -> str:
        pa_, pb = self.tree.path(a), self.tree.path(b)
        k = 0
        while k < min(len(pa_), len(pb)) and pa_[k].node_id == pb[k].node_id:
            k += 1
        return self.tree.prefix_text(pa_[k - 1]) if k else ""

    def answer_ok(self, n: Node) -> bool | None:
        ok = self.task.answer_correct(self.tree.response(n))
        if ok and self.task.has_step_verifier:
            ok = bool(n.correct)
        return ok

    def terminal_pairs(self) -> list[dict]:
        good, v = self.cfg.good_value_threshold, self.cfg.v_threshold
        right, wrong = [], []
        for n in self.terminals():
            r = to_pm1(n, self.method)
            if not self.cfg.require_verified:
                ok = wrong_answer = None
            else:  # right: right answer AND (with a step verifier) every step right; wrong: a wrong answer.
                ok = self.answer_ok(n)  # a right answer reached through a wrong step is neither: never paired
                answer = self.task.answer_correct(self.tree.response(n))
                wrong_answer = None if answer is None else not answer
            if r >= good and ok is not False:
                right.append(n)
            elif r <= good - v and wrong_answer is not False:
                wrong.append(n)
        if not right or not wrong:
            return []
        rng = random.Random(f"terminal|{self.tree.tree_id}")  # the same tree always gives the same pairs
        rng.shuffle(right)
        rng.shuffle(wrong)
        short, long_ = (right, wrong) if len(right) <= len(wrong) else (wrong, right)
        tiles = min(len(long_) // len(short) + 1, self.cfg.max_gb_ratio)
        zipped = zip(long_, short * tiles)
        out = []
        for a, b in zipped:
            c, r = (a, b) if short is wrong else (b, a)
            sc, sr = to_pm1(c, self.method), to_pm1(r, self.method)
            if self.keep(sc, sr):
                out.append(self.pair("terminal", c, r, sc, sr, self.common_prefix(c, r), {}))
        return out

    def list_scale(self) -> tuple[float, float]:
        scale = self.tree.info.get("list_scale")
        return (float(scale[0]), float(scale[1])) if scale else LIST_SCALE

    def ranked(self) -> tuple[list[Node], list[float]]:
        nodes = self.terminals()
        by_model = self.tree.info.get("list_scores")
        if by_model is None:
            scores = [graded_score(self.tree, self.task, n, self.method) for n in nodes]
        else:  # a judge / reward model scored them; one it could not score (an unparsed answer) is left out
            nodes = [n for n in nodes if n.node_id in by_model]
            scores = [by_model[n.node_id] for n in nodes]
        scored = sorted(((s, i, n) for i, (s, n) in enumerate(zip(scores, nodes))), key=lambda t: (-t[0], t[1]))
        if len(scored) > self.cfg.list_size:  # keep the best, the worst and evenly spaced ranks between
            step = (len(scored) - 1) / (self.cfg.list_size - 1)
            scored = [scored[round(i * step)] for i in range(self.cfg.list_size)]
        return [n for _, _, n in scored], [s for s, _, _ in scored]

    def list_row(self, nodes: list[Node], scores: list[float]) -> dict | None:
        if len(nodes) < 2 or (self.cfg.tie_policy == "drop" and len(set(scores)) == 1):
            return None
        t = self.tree
        extra = {"tree_id": t.tree_id, "node_ids": [n.node_id for n in nodes]}
        if "list_scorer" in t.info:
            extra["scored_by"] = t.info["list_scorer"]
            if self.task.has_gold:
                extra["verifier_scores"] = [graded_score(t, self.task, n, self.method) for n in nodes]
        lo, hi = self.list_scale()
        return {"prompt_id": t.prompt_id, "prompt": t.prompt, "responses": [t.response(n) for n in nodes],
                "scores": scores, "score_min": lo, "score_max": hi,
                "steps": [t.trajectory(n) for n in nodes], "method": self.method,
                "extra": json.dumps(extra),
                "row_key": hashlib.sha256(f"{self.row['row_key']}\0list".encode()).hexdigest(),
                "status": "ok", "error": None}

    def run(self) -> tuple[list[dict], list[dict]]:
        pairs = []
        mode = self.step_mode()
        if mode == "first_wrong_step":
            pairs += self.first_wrong_step_pairs()
        elif mode != "none":
            pairs += self.valued_sibling_pairs(mode)
        if self.cfg.terminal_pairs:
            pairs += self.terminal_pairs()
        nodes, scores = self.ranked()
        lst = self.list_row(nodes, scores)
        if self.cfg.list_pairs and self.method == "tpo_tree" and lst is not None and scores[0] != scores[-1]:
            pairs.append(self.pair("list", nodes[0], nodes[-1], scores[0], scores[-1],
                                   self.common_prefix(nodes[0], nodes[-1]), {}, scale=self.list_scale()))
        return pairs, [lst] if lst else []


def mine_trees(trees: list[tuple[Tree, dict]], cfg: MiningConfig, *, gold_fallback: bool = False,
               chosen_continuation: bool = False) -> tuple[list[dict], list[dict]]:
    """Pair records (with `extra` still a dict) and list records of (tree, row) items, duplicates removed.
    `row` needs the tree's `row_key` and `generator_model`."""
    pairs, lists = [], []
    for tree, row in trees:
        task = task_from_info(tree.prompt, tree.info)
        p, ls = _Miner(tree, row, task, cfg, gold_fallback, chosen_continuation).run()
        pairs += p
        lists += ls
    return dedup(pairs), lists


def dedup(pairs: list[dict]) -> list[dict]:
    """Keep the first pair of each pair_id (same prompt, chosen and rejected), in order (polars)."""
    if not pairs:
        return []
    import polars as pl

    keep = (pl.DataFrame({"pair_id": [p["pair_id"] for p in pairs]}).with_row_index("i")
            .unique(subset="pair_id", keep="first", maintain_order=True)["i"].to_list())
    return [pairs[i] for i in keep]


def pairs_table(pairs: list[dict]) -> pa.Table:
    return make_pairs(pairs, GROUPS, PAIR_COLUMNS)


def lists_table(lists: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(lists, schema=RANKED_LISTS)


def mine(trees: pa.Table, cfg: MiningConfig, *, gold_fallback: bool = False,
         chosen_continuation: bool = False) -> tuple[pa.Table, pa.Table]:
    """(pairs, lists) tables from a TREES table, with no model calls (re-mining stored trees)."""
    require_trees(trees)  # a parent cycle would make mining walk it forever
    pairs, lists = mine_trees(trees_from_table(trees), cfg, gold_fallback=gold_fallback,
                              chosen_continuation=chosen_continuation)
    return pairs_table(pairs), lists_table(lists)
