"""The import rules of docs/design.md ("Import rules"), checked on the source tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = {"satdata.store", "satdata.errors", "satdata.clikit", "satdata.atomic", "satdata"}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
    return out


def test_sattrain_imports_only_the_floor_of_satdata() -> None:
    bad = [f"{p.relative_to(REPO)}:{line}: {mod}" for p in sorted((REPO / "sattrain").glob("*.py"))
           for line, mod in _imports(p) if mod.startswith("satdata") and mod not in FLOOR]
    assert not bad, bad


def test_only_the_saliency_wing_imports_sattrain() -> None:
    bad = [f"{p.relative_to(REPO)}:{line}: {mod}" for p in sorted((REPO / "satdata").rglob("*.py"))
           if "saliency" not in p.relative_to(REPO / "satdata").parts
           for line, mod in _imports(p) if mod.startswith("sattrain")]
    assert not bad, bad


def test_run_directory_file_names_are_spelled_in_rundir_only() -> None:
    names = re.compile(r"""["'](config\.json|metrics\.jsonl?|checkpoint\.pt|best\.pt|summary\.json|eval(-paper)?\.json)["']""")
    bad = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "sattrain").glob("*.py")) if p.name != "rundir.py"
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if names.search(line) and not line.lstrip().startswith("#")]
    assert not bad, bad


def test_files_cited_in_code_and_docs_exist() -> None:
    """Help texts, docstrings and docs cite only files that are in the repository."""
    cited = re.compile(r"\b((?:docs|bench|tests|manifests|satdata|sattrain|\.ci)/[\w./-]+\.(?:md|py|json)"
                       r"|(?:README|BENCHMARKS)\.md)\b")
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md") and ".venv" not in p.parts
             and ".git" not in p.parts and "results" not in p.parts and p.is_file()]
    missing = set()
    for p in files:
        for m in cited.finditer(p.read_text(errors="replace")):
            ref = m.group(1).rstrip(".")
            # patterns, placeholders (manifests/x.json) and outputs a script writes (bench/results/)
            if "*" in ref or "<" in ref or "NAME" in ref or ref.startswith("bench/results/") \
                    or re.search(r"/[a-z]\.json$", ref):
                continue
            if not (REPO / ref).exists():
                missing.add(f"{p.relative_to(REPO)}: {ref}")
    assert not missing, sorted(missing)
