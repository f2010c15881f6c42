"""The package's layering, read from the source with ``ast`` (no imports, no processes).

- ``core/`` is pure: no torch.distributed, no DeepSpeed engine, no Megatron, no other layer of this package;
- ``repair/`` and ``megatron/`` never import the DeepSpeed engine nor the engine-side layers;
- no import cycles between the package's modules, lazy (function-level) imports included;
- no module reaches into another's private names, and private DeepSpeed / torch.distributed names appear only in
  ``pipe/ds_internals.py``;
- no library module is much over 450 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PKG = "deepspeed_checkfree"
ROOT = Path(__file__).resolve().parents[2] / PKG
DS_INTERNALS = f"{PKG}.pipe.ds_internals"
MAX_LINES = 460

# Names that stand for "the DeepSpeed engine" (importing any of them loads and means the engine).
DEEPSPEED_ENGINE = ("deepspeed.runtime.pipe.engine", "deepspeed.runtime.engine", "deepspeed.initialize",
                    "deepspeed.PipelineEngine", "deepspeed.DeepSpeedEngine")
# Private names of other libraries that are fine to use where they are (not DeepSpeed's, not c10d's).
FOREIGN_PRIVATE_OK = {"_exit", "_foreach_mul_", "_option_string_actions", "_getframe", "_current_frames"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES: Dict[str, ast.Module] = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def imports(mod: str) -> Iterator[Tuple[str, List[str], int]]:
    """(imported module, imported names, line) for every import statement in ``mod``, lazy ones included."""
    for node in ast.walk(TREES[mod]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_package(mod) else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, [a.name for a in node.names], node.lineno


def internal_targets(mod: str) -> Iterator[Tuple[str, int]]:
    """The package modules ``mod`` imports (``from . import x`` counts as importing module ``x``)."""
    for target, names, line in imports(mod):
        if not target.startswith(PKG):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        for t in subs or ([target] if target in MODULES else []):
            yield t, line


def full_names(mod: str) -> Iterator[Tuple[str, int]]:
    for target, names, line in imports(mod):
        yield target, line
        for n in names:
            yield f"{target}.{n}", line


def in_layer(mod: str, layer: str) -> bool:
    return mod == f"{PKG}.{layer}" or mod.startswith(f"{PKG}.{layer}.")


def violations(mods, forbidden) -> List[str]:
    out = []
    for mod in mods:
        for name, line in full_names(mod):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{MODULES[mod].relative_to(ROOT.parent)}:{line} imports {name}")
    return out


def test_core_is_pure():
    core = [m for m in MODULES if in_layer(m, "core")]
    assert core, "no core package found"
    forbidden = ("torch.distributed", "megatron") + DEEPSPEED_ENGINE + tuple(
        f"{PKG}.{layer}" for layer in ("pipe", "resilience", "repair", "megatron", "experiment", "models"))
    assert violations(core, forbidden) == []


def test_repair_and_megatron_do_not_import_the_deepspeed_engine():
    mods = [m for m in MODULES if in_layer(m, "repair") or in_layer(m, "megatron")]
    forbidden = DEEPSPEED_ENGINE + (f"{PKG}.pipe", f"{PKG}.resilience")
    assert violations(mods, forbidden) == []


def test_no_import_cycles():
    graph: Dict[str, Set[str]] = {m: {t for t, _ in internal_targets(m) if t != m} for m in MODULES}
    # A package imports its own children by design (re-exports); a child importing its package is a cycle only if
    # the package also imports the child.
    cycles, state = [], {}

    def visit(node: str, stack: List[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_uses_another_modules_private_names():
    bad = []
    for mod in MODULES:
        for target, names, line in imports(mod):
            if target.startswith(PKG) and target != mod:
                bad += [f"{mod}:{line} imports {target}.{n}" for n in names if _private(n)]
    assert bad == []


def _hooked_methods() -> Set[str]:
    """The DeepSpeed methods ds_internals lists as overridden or called by the engine's subclasses."""
    names: Set[str] = set()
    for node in TREES[DS_INTERNALS].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.endswith("_METHODS"):
            names |= set(ast.literal_eval(node.value))
    return names


def test_private_deepspeed_and_c10d_names_only_in_ds_internals():
    """Outside ds_internals, no ``obj._name`` except on ``self``/``cls``/``super()``, a base-class call of a method
    ds_internals lists, this package's own ``_checkfree`` markers, and a few private names of other libraries
    (torch's ``_foreach`` kernels, argparse's option table)."""
    hooked = _hooked_methods()
    assert {"_exec_schedule", "_partition_layers"} <= hooked
    bad = []
    for mod, tree in TREES.items():
        if mod == DS_INTERNALS:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            if isinstance(owner, ast.Name) and owner.id[:1].isupper() and node.attr in hooked:
                continue  # PipelineEngine._exec_schedule(self, ...): the base of an overridden method
            if node.attr.startswith("_checkfree") or node.attr in FOREIGN_PRIVATE_OK:
                continue
            bad.append(f"{MODULES[mod].relative_to(ROOT.parent)}:{node.lineno} uses .{node.attr}")
    assert bad == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_library_modules_stay_small(mod):
    lines = len(MODULES[mod].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[mod]} has {lines} lines; split it by concern (limit ~450)"


def test_layers_are_packages():
    for layer in ("core", "pipe", "resilience", "repair", "megatron", "experiment", "models"):
        assert (ROOT / layer / "__init__.py").exists(), layer
