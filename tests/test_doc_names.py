"""Every code name the docs mention resolves: dotted ``storm_lib.…`` names import, and
``storm_lib/…`` paths exist.

Scanned: ``README.md``, ``docs/**/*.md`` and the notebook's markdown cells, so that a
module moved or a class renamed cannot leave a stale name behind in the prose.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "p04_transformer_backbone.ipynb"

DOTTED = re.compile(r"(?<![\w.])storm_lib(?:\.[A-Za-z_]\w*)+")
"""``storm_lib.a.B.c``; stops at ``(``, ``[``, spaces and a sentence's full stop."""
PATH = re.compile(r"(?<![\w./-])storm_lib/[\w./-]*")
"""``storm_lib/models/vae.py``, ``storm_lib/``; trailing punctuation is stripped after."""


def format_names() -> set[str]:
    """The file format identifiers the library defines (a module's ``FORMAT``, such as the
    checkpoints' ``storm_lib/1``): names, not paths."""
    import storm_lib

    names = set()
    for info in pkgutil.walk_packages(storm_lib.__path__, "storm_lib."):
        if info.name != "storm_lib.__main__":
            value = getattr(importlib.import_module(info.name), "FORMAT", None)
            if isinstance(value, str):
                names.add(value)
    return names


def documents() -> Iterator[tuple[str, str]]:
    """``(where, text)`` of every scanned document (one per notebook markdown cell)."""
    yield "README.md", (ROOT / "README.md").read_text(encoding="utf-8")
    for path in sorted((ROOT / "docs").glob("**/*.md")):
        yield str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            yield f"{NOTEBOOK.name} cell {i}", "".join(cell["source"])


def mentions(text: str) -> tuple[list[str], list[str]]:
    """The dotted names and the paths in ``text``, as written (paths without trailing
    sentence punctuation)."""
    dotted = DOTTED.findall(text)
    paths = [m.rstrip(".,;:") for m in PATH.findall(text)]
    return dotted, paths


def resolve(name: str) -> object:
    """The object a dotted name means: the longest importable module prefix, then
    attributes (class attributes and dataclass fields included).

    Raises:
        LookupError: nothing by that name; the message says which part is missing.
    """
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # a dependency is missing, not the named module
            continue
        break
    else:  # pragma: no cover - storm_lib itself always imports
        raise LookupError(f"{name}: no module {parts[0]!r}")
    for i in range(cut, len(parts)):
        attr = parts[i]
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
        elif attr in getattr(obj, "__dataclass_fields__", {}) or attr in getattr(
            obj, "__annotations__", {}
        ):
            obj = None  # a field without a class-level default: it exists, nothing to descend
        else:
            found = ".".join(parts[:i])
            raise LookupError(f"{name}: {found} has no attribute {attr!r}")
    return obj


def stale_names() -> list[str]:
    """Every mention that does not resolve, as ``where: name (why)``."""
    formats = format_names()
    problems = []
    for where, text in documents():
        dotted, paths = mentions(text)
        for name in dotted:
            try:
                resolve(name)
            except LookupError as exc:
                problems.append(f"{where}: {exc}")
        for path in paths:
            if path not in formats and not (ROOT / path).exists():
                problems.append(f"{where}: {path} (no such file or folder)")
    return sorted(set(problems))


def test_every_code_name_in_the_docs_resolves() -> None:
    problems = stale_names()
    assert not problems, "stale code names in the docs:\n" + "\n".join(problems)


def test_the_scan_finds_names_in_every_kind_of_document() -> None:
    # A scan that silently found nothing would pass the test above vacuously.
    kinds = {"README.md": 0, NOTEBOOK.name: 0}
    for where, text in documents():
        found = sum(map(len, mentions(text)))
        for kind in kinds:
            if where.startswith(kind):
                kinds[kind] += found
    assert all(kinds.values()), kinds


@pytest.mark.parametrize(
    ("text", "dotted", "paths"),
    [
        ("`storm_lib.outside.DreamerAdapter(pixels=1)`", ["storm_lib.outside.DreamerAdapter"], []),
        ("see storm_lib.train.fit.", ["storm_lib.train.fit"], []),
        ("(`storm_lib/models/maskgit.py`; sizes)", [], ["storm_lib/models/maskgit.py"]),
        ("lives in storm_lib/models/vae.py.", [], ["storm_lib/models/vae.py"]),
        ('{"format": "storm_lib/1"}', [], ["storm_lib/1"]),
        ("python -m storm_lib play --storm x.pt", [], []),
        ("STORMWorldModel.imagine in storm_lib.models.storm", ["storm_lib.models.storm"], []),
    ],
)  # fmt: skip
def test_mentions_are_read_robustly_from_prose(text, dotted, paths) -> None:
    assert mentions(text) == (dotted, paths)


@pytest.mark.parametrize(
    "name",
    [
        "storm_lib.models.storm.STORMWorldModel.imagine",  # a class attribute
        "storm_lib.load_rssm_checkpoint",  # a lazily imported public name
        "storm_lib.types.Rollout.obs",  # a dataclass field without a default
        "storm_lib.evaluate",
    ],
)
def test_resolve_finds_attributes_fields_and_lazy_names(name: str) -> None:
    resolve(name)


@pytest.mark.parametrize(
    "name", ["storm_lib.rssm.RSSMWorldModel", "storm_lib.models.storm.NoSuchClass"]
)
def test_resolve_refuses_names_that_do_not_exist(name: str) -> None:
    with pytest.raises(LookupError):
        resolve(name)


CONFLICT = re.compile(r"^(<{7}|>{7}|={7})( |$)", re.M)


def test_no_merge_conflict_markers_are_left_in_the_sources_or_the_docs() -> None:
    """A half-resolved merge leaves ``<<<<<<<`` lines that neither ruff (in Markdown) nor
    the other tests see."""
    suffixes = {".py", ".md", ".toml", ".txt", ".ipynb", ".cfg", ".yaml"}
    files = [ROOT / "Makefile", ROOT / ".ci" / "run"] + [
        p for folder in ("storm_lib", "tests", "bench", "docs") for p in (ROOT / folder).rglob("*")
        if p.suffix in suffixes
    ] + [p for p in ROOT.glob("*") if p.suffix in suffixes]  # fmt: skip
    found = [
        str(p.relative_to(ROOT))
        for p in files
        if p.is_file() and CONFLICT.search(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not found, f"merge conflict markers in {found}"
