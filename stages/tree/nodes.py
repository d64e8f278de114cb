"""Search trees in memory and as rows of the TREES table (docs/stages.md).

A node is one step (one line on the bundled task). Node ids follow PRISM's tag scheme: the root is "0", its
children "0.1", "0.2", ..., so an id names its path. A node's trajectory is the step texts from the root's
child down to it; its response is the trajectory joined with the tree's join string ("\n" for line steps).
The root has no step text and is never part of a response.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from schemas.tables import TREE_NODE

# Columns of a stored node, in TREE_NODE order; `children` and `finish` are in-memory only.
NODE_COLUMNS = [f.name for f in TREE_NODE]


@dataclass
class Node:
    node_id: str
    parent_id: str | None
    depth: int
    step_text: str
    is_terminal: bool = False
    visits: int = 0
    value_sum: float = 0.0
    reward: float | None = None          # the direct evaluation of this node, on the method's value scale
    prior: float = 1.0                   # PUCB prior; 1.0 = uniform (PRISM's vLLM mode)
    answer: str | None = None            # the final answer a terminal node states
    correct: bool | None = None          # step-verified trajectory (or answer check when no step verifier)
    rollout_success: float | None = None  # share of rollouts from this node that reached the right answer
    greedy: bool | None = None           # the parent's greedy next step (greedy_first); None: not recorded
    children: list[str] = field(default_factory=list)

    @property
    def q_value(self) -> float | None:
        return self.value_sum / self.visits if self.visits else None

    def to_row(self) -> dict:
        row = {k: getattr(self, k) for k in NODE_COLUMNS if k != "q_value"}
        row["q_value"] = self.q_value
        return row


@dataclass
class Tree:
    """One prompt's tree plus what mining needs to re-verify it without the input row."""

    tree_id: str
    prompt_id: str
    prompt: str
    method: str
    join: str = "\n"
    nodes: dict[str, Node] = field(default_factory=dict)
    info: dict = field(default_factory=dict)   # gold answer, task meta, search stats: stored in `extra`

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes["0"] = Node("0", None, 0, "")

    @property
    def root(self) -> Node:
        return self.nodes["0"]

    def add_child(self, parent: Node, step_text: str, **attrs) -> Node:
        node = Node(f"{parent.node_id}.{len(parent.children) + 1}", parent.node_id, parent.depth + 1, step_text,
                    **attrs)
        self.nodes[node.node_id] = node
        parent.children.append(node.node_id)
        return node

    def children(self, node: Node) -> list[Node]:
        return [self.nodes[c] for c in node.children]

    def parent(self, node: Node) -> Node | None:
        return self.nodes[node.parent_id] if node.parent_id is not None else None

    def path(self, node: Node) -> list[Node]:
        """Nodes from the root's child down to `node` (empty for the root)."""
        out = []
        while node.parent_id is not None:
            out.append(node)
            node = self.nodes[node.parent_id]
        return out[::-1]

    def trajectory(self, node: Node) -> list[str]:
        return [n.step_text for n in self.path(node)]

    def response(self, node: Node) -> str:
        return self.join.join(self.trajectory(node))

    def prefix_text(self, node: Node) -> str:
        """What a continuation of `node` is conditioned on: its response plus the join ("" at the root)."""
        text = self.response(node)
        return text + self.join if text else ""

    def ancestors(self, node: Node) -> list[Node]:
        """`node` and every node above it, up to and including the root (the backup path)."""
        out = [node]
        while node.parent_id is not None:
            node = self.nodes[node.parent_id]
            out.append(node)
        return out

    def backup(self, node: Node, value: float) -> None:
        """PRISM's plain mean backup: every node on the path gets the value and one more visit."""
        for n in self.ancestors(node):
            n.value_sum += value
            n.visits += 1

    def to_row(self, *, row_key: str, generator_model: str, status: str = "ok", error: str | None = None) -> dict:
        return {"tree_id": self.tree_id, "prompt_id": self.prompt_id, "prompt": self.prompt, "method": self.method,
                "nodes": [n.to_row() for n in self.nodes.values()], "generator_model": generator_model,
                "extra": json.dumps({"join": self.join, **self.info}, sort_keys=True),
                "row_key": row_key, "status": status, "error": error}

    @classmethod
    def from_row(cls, row: dict) -> "Tree":
        """Rebuild a tree from a TREES row (as `Table.to_pylist` gives it); children come from parent ids."""
        info = json.loads(row.get("extra") or "{}")
        join = info.pop("join", "\n")
        nodes = {r["node_id"]: Node(**{k: r.get(k) for k in NODE_COLUMNS if k != "q_value"})
                 for r in row["nodes"]}
        for node in nodes.values():  # stored parents come before their children, so order is creation order
            if node.parent_id is not None:
                nodes[node.parent_id].children.append(node.node_id)
        tree = cls(row["tree_id"], row["prompt_id"], row["prompt"], row["method"], join, nodes=nodes, info=info)
        return tree


def search_stats(tree: Tree) -> dict:
    """Yield numbers of one tree: size, realised branching, depth histogram, duplicate rate."""
    nodes = list(tree.nodes.values())
    expanded = [n for n in nodes if n.children]
    depths: dict[str, int] = {}
    for n in nodes:
        depths[str(n.depth)] = depths.get(str(n.depth), 0) + 1
    sampled = tree.info.get("sampled_steps", 0)
    return {"nodes": len(nodes), "terminal": sum(n.is_terminal for n in nodes),
            "max_depth": max(n.depth for n in nodes), "depth_histogram": depths,
            "branching": sum(len(n.children) for n in expanded) / len(expanded) if expanded else 0.0,
            "duplicate_step_rate": tree.info.get("dropped_steps", 0) / sampled if sampled else None}


def trees_to_table(rows: list[dict]) -> pa.Table:
    from schemas.tables import TREES
    return pa.Table.from_pylist(rows, schema=TREES)


def trees_from_table(table: pa.Table) -> list[tuple[Tree, dict]]:
    """(tree, its row without the nodes) for every ok row of a TREES table."""
    out = []
    for row in table.to_pylist():
        if row.get("status", "ok") != "ok":
            continue
        out.append((Tree.from_row(row), {k: v for k, v in row.items() if k != "nodes"}))
    return out
