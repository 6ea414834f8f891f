"""The method decision tree: shipped as data (data/decision_tree.yaml), interpreted here.

A node names a test; the tests are the functions in TESTS, each answering (yes?, reason) from a Context.
The tree file is checked when loaded: every branch leads to a node or a leaf, every test exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memplan.catalog.paths import data_dir, load_yaml


@dataclass
class Context:
    """What the tests look at. `full_ft` is evaluated only when a test asks (it runs a plan search)."""

    domain_shift: str
    samples: int
    priority: str
    full_ft: Callable[[], tuple[bool, str]]
    _full_ft_answer: tuple[bool, str] | None = None

    def full_ft_answer(self) -> tuple[bool, str]:
        if self._full_ft_answer is None:
            self._full_ft_answer = self.full_ft()
        return self._full_ft_answer


def _domain_shift_high(ctx: Context) -> tuple[bool, str]:
    return ctx.domain_shift == "high", f"domain shift {ctx.domain_shift}"


def _full_ft_feasible(ctx: Context) -> tuple[bool, str]:
    return ctx.full_ft_answer()


def _samples_over(ctx: Context, threshold: int) -> tuple[bool, str]:
    sign = ">" if ctx.samples > threshold else "<="
    return ctx.samples > threshold, f"{ctx.samples:,} training samples {sign} {threshold:,}"


def _priority_quality(ctx: Context) -> tuple[bool, str]:
    return ctx.priority == "quality", f"priority {ctx.priority}"


TESTS: dict[str, Callable[..., tuple[bool, str]]] = {
    "domain_shift_high": _domain_shift_high,
    "full_ft_feasible": _full_ft_feasible,
    "samples_over": _samples_over,
    "priority_quality": _priority_quality,
}


@dataclass
class Step:
    node: str
    question: str
    answer: bool
    reason: str

    def to_json(self) -> dict:
        return {"question": self.question, "answer": "yes" if self.answer else "no", "reason": self.reason}


@dataclass
class Tree:
    root: str
    nodes: dict[str, dict]
    leaves: dict[str, dict]
    checklist: list[dict] = field(default_factory=list)

    def run_test(self, name: str, args: dict | None, ctx: Context) -> tuple[bool, str]:
        return TESTS[name](ctx, **(args or {}))

    def walk(self, ctx: Context) -> tuple[str, list[Step]]:
        """Follow the tree from the root; returns (leaf id, the steps taken)."""
        steps, at = [], self.root
        while at in self.nodes:
            node = self.nodes[at]
            yes, reason = self.run_test(node["test"], node.get("args"), ctx)
            steps.append(Step(at, node["question"], yes, reason))
            at = node["yes"] if yes else node["no"]
        return at, steps

    def checklist_warnings(self, ctx: Context) -> list[str]:
        """The items of the full-FT checklist (when to choose full fine-tuning) that fail."""
        out = []
        for item in self.checklist:
            ok, reason = self.run_test(item["check"], item.get("args"), ctx)
            if not ok:
                out.append(f"full fine-tuning checklist: {item['message']} ({reason})")
        return out

    def render(self, steps: list[Step], leaf: str | None, forced: str | None = None) -> str:
        """The tree as an indented outline, the path taken marked with '>>' and each answer's reason."""
        taken = {s.node: s for s in steps}
        lines = []

        def visit(at: str, depth: int, on_path: bool, label: str) -> None:
            pad = "    " * depth
            mark = ">> " if on_path else "   "
            if at in self.leaves:
                leaf_def = self.leaves[at]
                chosen = "   <== recommended" if on_path and at == leaf else ""
                lines.append(f"{pad}{mark}{label}{leaf_def['label']} ({leaf_def['why']}){chosen}")
                return
            node = self.nodes[at]
            step = taken.get(at) if on_path else None
            note = f"   [{'yes' if step.answer else 'no'}: {step.reason}]" if step else ""
            lines.append(f"{pad}{mark}{label}{node['question']}{note}")
            for branch in ("yes", "no"):
                visit(node[branch], depth + 1, bool(step) and step.answer == (branch == "yes"), f"{branch} -> ")

        visit(self.root, 0, forced is None, "")
        if forced:
            lines.append(f"(not followed: --method {forced} was given)")
        return "\n".join(lines)


def _check(tree: Tree, source: Path) -> Tree:
    def fail(msg: str) -> None:
        raise ValueError(f"{source}: {msg}")

    if tree.root not in tree.nodes:
        fail(f"root '{tree.root}' is not a node")
    for nid, node in tree.nodes.items():
        for key in ("question", "test", "yes", "no"):
            if key not in node:
                fail(f"node '{nid}' has no '{key}'")
        if node["test"] not in TESTS:
            fail(f"node '{nid}': unknown test '{node['test']}' (known: {', '.join(TESTS)})")
        for branch in ("yes", "no"):
            if node[branch] not in tree.nodes and node[branch] not in tree.leaves:
                fail(f"node '{nid}': '{branch}' leads to '{node[branch]}', neither a node nor a leaf")
    for lid, leaf in tree.leaves.items():
        methods = leaf.get("methods") or []
        if not methods or any(m not in ("full", "lora", "qlora") for m in methods):
            fail(f"leaf '{lid}': methods must be a non-empty list of full, lora, qlora")
    for item in tree.checklist:
        if item.get("check") not in TESTS:
            fail(f"full_ft_checklist: unknown check '{item.get('check')}'")
    return tree


def load_tree(path: Path | None = None) -> Tree:
    path = path or data_dir() / "decision_tree.yaml"
    raw: Any = load_yaml(path.read_text(encoding="utf-8"))
    # YAML 1.1 reads bare yes/no keys as booleans; accept both spellings.
    nodes = {nid: {({True: "yes", False: "no"}.get(k, k)): v for k, v in node.items()}
             for nid, node in (raw.get("nodes") or {}).items()}
    return _check(Tree(root=raw["root"], nodes=nodes, leaves=raw.get("leaves") or {},
                       checklist=raw.get("full_ft_checklist") or []), path)
