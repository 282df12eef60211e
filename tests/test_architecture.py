"""The layout of docs/ARCHITECTURE.md, checked: the layer table here is the document's, imports
go one way (down the layers), no import cycle between modules or between folders, no cdalign
import hidden inside a function, the math core free of model, Hub and process libraries, and
the ``python -m cdalign.hub`` command module for users only. Reads the source and the document
(``ast``, ``re``); imports nothing."""

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cdalign"
DOCUMENT = PACKAGE.parent / "docs" / "ARCHITECTURE.md"

# Lower layers never import higher ones (docs/ARCHITECTURE.md).
LAYERS = [
    # console: cdalign's warning category and the quieting of other libraries around its calls (imports
    # nothing from cdalign); recipes_data: the packaged recipes found by name
    (0, r"cdalign\.(registry|fields|hub_access|console|recipes_data)(\..*)?"),
    (1, r"cdalign\.core(\..*)?"),
    # run infrastructure: atomic files, checkpoint folders, processes, the statistics cache and its
    # keys, run folders, the typed report, signals (imports nothing from alignment/composition/evaluation)
    (2, r"cdalign\.runs(\.(atomic|checkpoints|distributed|fingerprints|normalization_cache|base_evaluation_cache|folders|lock|report|resources|signals))?"),
    (3, r"cdalign\.data(\..*)?"),
    (4, r"cdalign\.models(\..*)?"),
    (5, r"cdalign\.rewards(\..*)?"),
    (6, r"cdalign\.(publishing(\..*)?|evaluation\.scoring)"),
    (7, r"cdalign\.alignment\.(specs|estimator_settings|batch_estimate|estimators|rules|config)"),
    (8, r"cdalign\.evaluation(\..*)?"),
    # the trainer and what it keeps beside it; `cdalign align`
    (9, r"cdalign\.alignment(\.(trainer|checkpoint|report|dual_window|step_log|normalization|base_evaluation|shipped_statistics|trl_compat|command))?"),
    (10, r"cdalign\.composition(\..*)?"),
    # the demo's catalogue, engine, page, browser and command (demo/app.py and `cdalign demo` wire them)
    (11, r"cdalign\.demo(\..*)?"),
    # the public names, the `cdalign` console command (cli, __main__), and ``python -m cdalign.hub``
    (12, r"cdalign|cdalign\.(hub|cli|__main__)"),
]
# The one pair of folders that import each other, by design: evaluation/scoring.py (layer 6)
# sits below alignment/config.py (7), which the harness (evaluation/, 8) reads, below the
# trainer (alignment/, 9). Any other folder-level cycle fails.
INTERLEAVED_FOLDERS = [{"cdalign.alignment", "cdalign.evaluation"}]
COMMAND_MODULES = {"cdalign.hub"}  # run with ``python -m``, imported by nothing


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules) -> list[tuple[str, int, bool]]:
    """(imported cdalign module, line, inside a function or class body) for each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules and t != name:
                out.append((t, node.lineno, node.col_offset > 0))
    return out


def _rank(name: str) -> int:
    ranks = [rank for rank, pattern in LAYERS if re.fullmatch(pattern, name)]
    if not ranks:
        pytest.fail(f"{name} is in no layer of docs/ARCHITECTURE.md: add it to LAYERS and to the document")
    return ranks[0]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_import_goes_down_the_layers(graph):
    wrong = [f"{a} (layer {_rank(a)}) imports {b} (layer {_rank(b)}) at line {line}"
             for a, edges in graph.items() for b, line, _ in edges if _rank(b) > _rank(a)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    edges = {a: {b for b, _, _ in e} for a, e in graph.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state[nxt] == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif state[nxt] == 0:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if state[node] == 0:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def _folder(name: str) -> str:
    """The folder (``cdalign.models``) or top-level module (``cdalign.registry``) a module is in."""
    return ".".join(name.split(".")[:2])


def test_no_import_cycle_between_folders(graph):
    """Whole folders import one way too: the folder graph's strongly connected components
    (folders that reach each other through imports) are single folders, but for the
    interleaved pair named above."""
    edges: dict[str, set[str]] = defaultdict(set)
    for a, out in graph.items():
        edges[_folder(a)].update(_folder(b) for b, _, _ in out if _folder(b) != _folder(a))
    nodes = sorted(set(edges) | {b for out in edges.values() for b in out})

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reached = {n: reach(n) for n in nodes}
    components = {frozenset([n] + [m for m in nodes if m in reached[n] and n in reached[m]]) for n in nodes}
    cycles = [sorted(c) for c in components if len(c) > 1 and set(c) not in INTERLEAVED_FOLDERS]
    assert not cycles, "folders that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_run_infrastructure_knows_no_trainer_composer_or_harness(graph):
    users = [f"{a} imports {b}" for a, out in graph.items() if a.startswith("cdalign.runs")
             for b, _, _ in out if re.match(r"cdalign\.(alignment|composition|evaluation)(\.|$)", b)]
    assert not users, "\n".join(users)


def test_no_cdalign_import_inside_a_function(graph):
    hidden = [f"{a}:{line} imports {b} inside a function" for a, edges in graph.items() for b, line, inner in edges if inner]
    assert not hidden, "\n".join(hidden)


def test_the_command_module_is_imported_by_nothing_inside_cdalign(graph):
    users = [f"{a} imports the command module {b}" for a, edges in graph.items() for b, _, _ in edges
             if b in COMMAND_MODULES]
    assert not users, "\n".join(users)


def test_the_math_core_imports_only_the_registry(graph):
    """... and cdalign.console (the category of cdalign's warnings; quiet imports of diffusers)."""
    outside = [f"{a} imports {b}" for a, edges in graph.items() if a.startswith("cdalign.core")
               for b, _, _ in edges if not re.fullmatch(r"cdalign\.(core(\..*)?|registry|console)", b)]
    assert not outside, "\n".join(outside)


# The math core computes; loading models, switching adapters, reading the Hub and
# distributing work are done by the packages above it.
NOT_IN_THE_CORE = ("peft", "huggingface_hub", "accelerate", "safetensors", "torch.distributed")


def test_the_math_core_imports_no_adapter_hub_or_process_library():
    found = []
    for name, path in _modules().items():
        if not name.startswith("cdalign.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{name}:{node.lineno} imports {n}" for n in names
                      if any(n == lib or n.startswith(lib + ".") for lib in NOT_IN_THE_CORE)]
    assert not found, "\n".join(found)


def test_the_old_path_shims_are_gone():
    """``cdalign.config``, ``cdalign.trainer`` and ``cdalign.pipeline`` were removed: the
    names they gave are importable from ``cdalign`` (tests/test_public_names.py)."""
    assert [m for m in ("config", "trainer", "pipeline") if f"cdalign.{m}" in _modules()] == []


# ----------------------------------------------------------------------------- the document's table
def _document_layers() -> list[tuple[int, str]]:
    """(layer, module) for each module or folder the table of ARCHITECTURE.md's "Layers"
    names in its second column, as dotted names (``alignment/specs.py`` ->
    ``cdalign.alignment.specs``, ``fields/`` -> ``cdalign.fields``, ``__init__.py`` -> ``cdalign``)."""
    text = DOCUMENT.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 4 or not cells[1].isdigit():
            continue
        for path in re.findall(r"`([^`]+)`", cells[2]):
            dotted = path.rstrip("/").removesuffix(".py").replace("/", ".")
            rows.append((int(cells[1]), "cdalign" if dotted == "__init__" else f"cdalign.{dotted}"))
    return rows


def _document_rank(name: str, rows) -> int | None:
    """The layer of the document's most specific entry for module ``name`` (a file before its folder)."""
    matches = [(len(entry), layer) for layer, entry in rows if name == entry or name.startswith(entry + ".")]
    return max(matches)[1] if matches else None


def test_the_layer_table_is_the_one_of_architecture_md():
    rows = _document_layers()
    assert {layer for layer, _ in rows} == {layer for layer, _ in LAYERS}, "layer numbers differ from the document's"
    differ = [f"{name}: layer {_rank(name)} here, {_document_rank(name, rows)} in docs/ARCHITECTURE.md"
              for name in sorted(_modules()) if _rank(name) != _document_rank(name, rows)]
    assert not differ, "\n".join(differ)


FAMILY_BRANCH = re.compile(
    r"(\bfamily\w*(\.\w+)?|\bpipeline_class|\.__name__)\s*(==|!=)\s*[\"'](?!__main__)"
    r"|isinstance\([^)]*\b(StableDiffusion|Flux)\w*Pipeline\b"
)


def test_no_module_branches_on_a_model_family_outside_the_registry():
    """A family is one entry of ``MODEL_FAMILIES`` (``core/families.py``) and what its fields say:
    no other module compares a family's name or a pipeline's class to a literal (issue 36)."""
    found = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).as_posix() != "core/families.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if FAMILY_BRANCH.search(line)]
    assert found == []


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}
