"""The public names docs/ARCHITECTURE.md promises, checked: every name of its "Public names"
section is importable from ``cdalign`` and is in ``cdalign.__all__`` (and no other), every
registry of its "Registries" section is importable from ``cdalign``, every ``from cdalign
import ...`` written in the docs, the model-card templates and cdalign's docstrings resolves,
and a model card imports from ``cdalign`` only."""

import re
from pathlib import Path

import pytest

import cdalign
from cdalign.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _section(title: str) -> str:
    return ARCHITECTURE.read_text(encoding="utf-8").split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _documented_public_names() -> list[str]:
    """The names in backquotes on the list items ("- ...") of the section "Public names"."""
    items = [line for line in _section("Public names").splitlines() if line.startswith("- ")]
    return [n for line in items for n in re.findall(r"`(\w+)`", line.split(":", 1)[1])]


def test_every_public_name_of_architecture_md_is_importable_from_cdalign():
    names = _documented_public_names()
    assert len(names) >= 40
    missing = [n for n in names if not hasattr(cdalign, n)]
    assert not missing, f"ARCHITECTURE.md names these public names, which cdalign does not give: {missing}"


def test_architecture_md_lists_exactly_the_names_of_cdalign_all():
    assert sorted(_documented_public_names()) == sorted(cdalign.__all__)
    assert len(set(cdalign.__all__)) == len(cdalign.__all__)


def test_every_registry_of_architecture_md_is_importable_from_cdalign():
    names = set(re.findall(r"`([A-Z][A-Z_]+)`", _section("Registries")))
    assert {"REWARDS", "CHECKPOINT_KINDS", "COMPONENT_KINDS", "MODEL_FAMILIES"} <= names
    for name in sorted(names):
        assert isinstance(getattr(cdalign, name, None), Registry), f"cdalign.{name}"


def _written_imports() -> list[tuple[str, str]]:
    """(file, name) for each name of a ``from cdalign import ...`` in the docs, the READMEs,
    the model-card templates and the docstrings of cdalign's modules."""
    files = [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "model_cards").glob("*.md"),
             *(ROOT / "demo").rglob("*.md"), *(ROOT / "evaluation").rglob("*.md"), *(ROOT / "cdalign").rglob("*.md"),
             *(ROOT / "cdalign").rglob("*.py")]
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^\s*from cdalign import (\([^)]*\)|[^\n]+)", text, re.M):
            names = re.sub(r"#[^\n]*", "", match.group(1)).strip("()")
            found += [(str(path.relative_to(ROOT)), n.strip()) for n in names.split(",") if n.strip()]
    return found


def test_every_written_from_cdalign_import_resolves():
    found = _written_imports()
    assert len(found) >= 5
    wrong = [f"{path}: {name}" for path, name in found if name not in cdalign.__all__]
    assert not wrong, "from cdalign import of names that cdalign does not give:\n" + "\n".join(wrong)


@pytest.mark.parametrize("template", sorted((ROOT / "model_cards").glob("*.md")), ids=lambda p: p.name)
def test_a_model_card_template_imports_from_cdalign_only(template):
    assert not re.findall(r"from cdalign\.\w", template.read_text(encoding="utf-8"))


def test_the_card_usage_snippet_of_an_embedded_base_imports_from_cdalign_only():
    from cdalign.publishing.cards import usage_snippet

    code = usage_snippet("cdalign/tiny-shapes-sd", "you/lora", "a red circle", 20, 3.0)
    assert "from cdalign import load_pipeline" in code and "from cdalign." not in code
