"""The project documents itself: every citation of docs/ points at an existing heading, and nothing cites the
design maps that once lived outside the repository (their file names, section numbers or defect codes)."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
THIS = Path(__file__).resolve()

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh"}
TEXT_NAMES = {"Dockerfile", ".dockerignore", ".gitignore", "run"}
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "data",
                "results", "models", "ray_results", "mlruns", "mlartifacts"}

# the external maps' file names, spelt so that this file does not match itself
EXTERNAL_MAPS = tuple(name + ".md" for name in ("ALGORITHM", "DESIGN", "RAY_NOTES"))
# a defect code of the external catalogue (F1..F28, O1..O10); ruff's rule codes have three digits
DEFECT_CODE = re.compile(r"\b[FO][0-9]{1,2}\b")
# a numbered section of the external maps, e.g. "(3.5)", "(5.1, ...)", "(5.3 step 2)", "section 4"
SECTION_NUMBER = re.compile(r"\([1-8]\.[0-9](?:[),]| step | --| \")|\bsections? [1-8](?:\.[0-9])?\b")
# `docs/<file>.md "Heading"` anywhere; `(<file>.md "Heading")` in a link between docs pages
CITATION = re.compile(r"docs/([a-z0-9_-]+)\.md \"([^\"\n]+)\"")
DOC_FILE = re.compile(r"\bdocs/([a-z0-9_-]+)\.md\b")
DOCS_LINK = re.compile(r"\]\(([a-z0-9_-]+)\.md \"([^\"\n]+)\"\)")
# `(difference "seed-once", docs/algorithm.md)`; inside docs also difference `seed-once`
DIFFERENCE = re.compile(r"difference \"([a-z0-9-]+)\"")
DIFFERENCE_IN_DOCS = re.compile(r"differences? ((?:`[a-z0-9-]+`(?:, )?)+)")


def _is_text(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES


def repository_files() -> list[Path]:
    """The repository's text files: what git tracks or would track, else a walk of the checkout."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
        paths = [ROOT / line for line in out]
    except (OSError, subprocess.SubprocessError):
        paths = [p for p in ROOT.rglob("*") if not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted({p for p in paths if p.is_file() and _is_text(p)})


@cache
def headings(doc: str) -> dict[str, list[str]]:
    """Heading text -> the chain of headings above it (outermost first), for docs/<doc>.md."""
    chain: list[tuple[int, str]] = []
    found: dict[str, list[str]] = {}
    in_code = False
    for line in (DOCS / f"{doc}.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^(#{1,6}) (.+?)\s*$", line)
        if match:
            level = len(match.group(1))
            chain = [(lv, text) for lv, text in chain if lv < level]
            found[match.group(2)] = [text for _, text in chain]
            chain.append((level, match.group(2)))
    return found


def differences() -> set[str]:
    """The names of the differences listed in docs/algorithm.md."""
    section = "Differences from the original research code"
    return {name for name, above in headings("algorithm").items() if section in above}


def _comments_and_docstrings(text: str) -> str:
    """The comments and triple-quoted strings of Python source (code literals such as 1.5 stay out)."""
    parts = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.string.endswith(('"""', "'''"))):
            parts.append(token.string)
    return "\n".join(parts)


def _prose(path: Path, text: str) -> str:
    """Where a section number of the external maps could hide: comments and docstrings, YAML comments."""
    if path.suffix == ".py":
        return _comments_and_docstrings(text)
    if path.suffix in (".yaml", ".yml") or path.name == "Dockerfile":
        return "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#")
                         or line.startswith("description:"))
    return ""


def test_docs_exist():
    for name in ("algorithm", "architecture", "sweep", "ray-optuna-mlflow"):
        assert headings(name), f"docs/{name}.md has no headings"


def test_nothing_cites_the_external_maps():
    offenders = []
    for path in repository_files():
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        if path == THIS:   # its patterns and examples
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(name in line for name in EXTERNAL_MAPS):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
            if DEFECT_CODE.search(line):
                offenders.append(f"{rel}:{lineno}: defect code {DEFECT_CODE.search(line).group()}: {line.strip()}")
        for match in SECTION_NUMBER.finditer(_prose(path, text)):
            offenders.append(f"{rel}: section number {match.group()!r}")
    assert not offenders, "cite docs/<file>.md \"Heading\" or a named difference instead:\n" + "\n".join(offenders)


def test_every_cited_docs_file_exists():
    missing = sorted({f"{path.relative_to(ROOT)}: docs/{doc}.md" for path in repository_files()
                      for doc in DOC_FILE.findall(path.read_text(errors="replace"))
                      if not (DOCS / f"{doc}.md").is_file()})
    assert not missing, "cited documents that do not exist:\n" + "\n".join(missing)


def test_every_docs_citation_names_an_existing_heading():
    broken = []
    for path in repository_files():
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        cited = CITATION.findall(text)
        if path.parent == DOCS:
            cited += DOCS_LINK.findall(text)
        for doc, heading in cited:
            if (DOCS / f"{doc}.md").is_file() and heading not in headings(doc):
                broken.append(f"{rel}: docs/{doc}.md has no heading {heading!r}")
    assert not broken, "\n".join(broken)


def test_every_cited_difference_is_listed():
    listed = differences()
    assert {"seed-once", "si-scope", "bce-check", "rep-f-temperature"} <= listed
    missing = []
    for path in repository_files():
        text = path.read_text(errors="replace")
        names = DIFFERENCE.findall(text)
        if path.parent == DOCS:
            names += [n for group in DIFFERENCE_IN_DOCS.findall(text) for n in re.findall(r"`([a-z0-9-]+)`", group)]
        missing += [f"{path.relative_to(ROOT)}: {name}" for name in names if name not in listed]
    assert not missing, "differences cited but not listed in docs/algorithm.md:\n" + "\n".join(missing)


@pytest.mark.parametrize("heading", ["Trial statuses", "Result keys", "ASHA rungs and ties", "Optuna reporting",
                                     "MLflow run layout", "The sweep folder", "Resume"])
def test_sweep_doc_has_the_sections_the_code_cites(heading):
    assert heading in headings("sweep")


# a constant of the code quoted in the docs: `NAME`, and `NAME` = value where the docs give its value
QUOTED_CONSTANT = re.compile(r"`([A-Z][A-Z0-9_]{3,})`")
QUOTED_VALUE = re.compile(r"`([A-Z][A-Z0-9_]{3,})` = ([0-9][0-9.e+-]*)")
CODE_PACKAGES = ("tune_bir", "trainables", "search_spaces", "analysis", "benchmarks")


@cache
def code_constants() -> dict[str, list[object]]:
    """Module-level constants of the project's code: name -> its values (None where not a literal), one per module."""
    found: dict[str, list[object]] = {}
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                    if isinstance(node, ast.AnnAssign) and node.value is not None else []
                for target in targets:
                    if isinstance(target, ast.Name) and target.id.isupper():
                        try:
                            value = ast.literal_eval(node.value)
                        except ValueError:
                            value = None
                        found.setdefault(target.id, []).append(value)
    return found


@cache
def code_strings() -> set[str]:
    """Every string constant of the project's code (environment variables, statuses, protocol names)."""
    return {node.value for package in CODE_PACKAGES for path in (ROOT / package).rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_constants_the_docs_quote_exist_with_the_quoted_values():
    stale = []
    for doc in ("algorithm", "architecture", "extending"):   # the documents that describe the code
        text = (DOCS / f"{doc}.md").read_text()
        for name in sorted(set(QUOTED_CONSTANT.findall(text))):
            if name not in code_constants() and name not in code_strings():
                stale.append(f"docs/{doc}.md: `{name}` is no constant of the code")
        for name, quoted in QUOTED_VALUE.findall(text):
            values = code_constants().get(name, [])
            if float(quoted.rstrip(".")) not in [v for v in values if isinstance(v, (int, float))]:
                stale.append(f"docs/{doc}.md: `{name}` = {quoted}, the code has {values}")
    assert not stale, "\n".join(stale)


def test_every_core_module_is_in_the_architecture_table():
    """docs/architecture.md "Core package" names each module of tune_bir/ (a new or renamed one breaks this)."""
    text = (ROOT / "docs" / "architecture.md").read_text().partition("## Core package")[2].partition("\n## ")[0]
    missing = [p.name for p in sorted((ROOT / "tune_bir").glob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in text]
    assert not missing, f"docs/architecture.md \"Core package\" lacks {missing}"


def test_the_readme_quotes_the_term_budgets_of_the_benchmark():
    from benchmarks.engine_speed import CPU_TERM_BUDGETS

    readme = " ".join((ROOT / "README.md").read_text().split())
    quoted = re.search(r"`CPU_TERM_BUDGETS`: x([0-9.]+) for repulsion and both reconstruction terms, "
                       r"x([0-9.]+) for contrastive", readme)
    assert quoted, "README.md no longer quotes CPU_TERM_BUDGETS"
    additive, contrastive = map(float, quoted.groups())
    assert CPU_TERM_BUDGETS == {"repulsion": additive, "recon_repulsion": additive, "recon_attraction": additive,
                                "contrastive": contrastive}
