"""The documentation is current: every repository path it names exists, every relative link and anchor
resolves, and docs/configuration.md is what scripts/config_reference.py writes from the config now.

A "repository path" is text that starts with one of the repository's top-level folders (``src/``,
``configs/``, ``scripts/``, ``docs/``, ``tests/``, ``benchmarks/``, ``flower_app/``, ``.ci/``), or, in
markdown prose, a ``.py`` file named relative to ``src/fltac`` (``client/train.py``, ``fltac/data/glue.py``);
the package tree in a code block names bare files under their folder lines, which only root paths check.
Output folders (``results/``, ``exported/``, ``data/demo/``) are what commands write, so they are not
checked; nor is a path glued to a prefix (``$PWD/configs/...``) or a pattern (``scripts/hafl_*``).
"""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fltac"
TOP = ("src", "configs", "scripts", "docs", "tests", "benchmarks", "flower_app", ".ci")
#: A path from the repository root: starts at a word boundary that is not part of a longer path.
ROOT_PATH = re.compile(r"(?<![\w/$.~-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./-]*)")
#: A Python module named relative to the package, as the docs do (``server/hafl.py``, ``fltac/export.py``).
PACKAGE_PATH = re.compile(r"(?<![\w/$.~-])((?:fltac/)?(?:[a-z_][a-z0-9_]*/)*[a-z_][a-z0-9_]*\.py)\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATTERN_CHARS = "*{<["


def documentation() -> list[Path]:
    """README, docs pages, configs, scripts and the package source: every text a reader follows paths from."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder, patterns in (("configs", ("*.yaml",)), ("scripts", ("*.py", "*.sh")), ("benchmarks", ("*.py",)),
                             ("src/fltac", ("**/*.py",)), ("flower_app", ("**/*.py",))):
        for pattern in patterns:
            files.extend(sorted((ROOT / folder).glob(pattern)))
    files.extend([ROOT / "pyproject.toml", ROOT / "flower_app" / "pyproject.toml", ROOT / ".ci" / "run"])
    return files


def named_paths(text: str, markdown: bool) -> set[str]:
    """The repository paths ``text`` names (trailing punctuation dropped; patterns and placeholders skipped)."""
    found = set()
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.M | re.S)  # a tree in a code block names bare files
    searches = [(ROOT_PATH, text), (PACKAGE_PATH, prose)] if markdown else [(ROOT_PATH, text)]
    for regex, text in searches:
        for m in regex.finditer(text):
            end = m.end(1)
            if end < len(text) and text[end] in PATTERN_CHARS:
                continue
            path = m.group(1).rstrip(".-")
            if regex is PACKAGE_PATH and path.startswith(TOP):
                continue  # already a root path
            found.add(path)
    return found


def exists(path: str) -> bool:
    """Whether ``path`` is in the repository: from its root, or a module path inside src/fltac."""
    if path.startswith(TOP):
        return (ROOT / path).exists()
    relative = path.removeprefix("fltac/")
    return (PACKAGE / relative).exists() or any(PACKAGE.glob(f"*/{relative}"))


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a markdown page defines (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Relative links of a markdown page whose file or anchor does not exist."""
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not the repository's business
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    return bad


def test_the_path_finder_reads_what_a_reader_would():
    text = ("see `configs/text5.yaml`, [page](docs/flower.md#tls) and client/train.py; `results/text5_fltac` "
            "is written; scripts/hafl_* and $PWD/configs/x.yaml and <dir>/docs/a.md are not paths; "
            "tests/test_flower.py::test_x, fltac/data/glue.py.")
    assert named_paths(text, markdown=True) == {"configs/text5.yaml", "docs/flower.md", "client/train.py",
                                                 "tests/test_flower.py", "fltac/data/glue.py"}
    assert named_paths(text, markdown=False) == {"configs/text5.yaml", "docs/flower.md", "tests/test_flower.py"}
    assert exists("client/train.py") and exists("fltac/data/glue.py") and exists("train.py")
    assert not exists("docs/nowhere.md") and not exists("client/nowhere.py")
    assert slug("Vision: ViT + LoRA on images (`vision_offline`, offline; `cifar`, hub)") == \
        "vision-vit--lora-on-images-vision_offline-offline-cifar-hub"


@pytest.mark.parametrize("source", documentation(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_the_documentation_names_exists(source):
    missing = sorted(p for p in named_paths(source.read_text(), source.suffix == ".md") if not exists(p))
    assert not missing, f"{source.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", [p for p in documentation() if p.suffix == ".md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links {broken_links(page)}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f"]({p}" not in readme] == []


def test_the_readme_is_a_front_page_with_the_two_commands_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260
    first_block = next(i for i, line in enumerate(lines) if line.startswith("```"))
    commands = [line for line in lines[first_block:first_block + 6] if line.startswith("bash scripts/setup.sh")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(commands) == 2 and "fltac run --config configs/text5.yaml" in commands[0]
    assert commands[1].endswith(ci.strip().splitlines()[-1].strip())  # the test command is CI's


def test_the_configuration_reference_is_current():
    generator = runpy.run_path(str(ROOT / "scripts" / "config_reference.py"))
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == generator["page"](), "docs/configuration.md is stale: run " \
                                                    "python scripts/config_reference.py"


def test_the_configuration_reference_lists_every_key_with_its_help():
    from fltac import config

    text = (ROOT / "docs" / "configuration.md").read_text()
    for key in config._leaf_keys():
        assert f"| `{key}` |" in text, key
    assert "`fltac`, `fedit`, `centralized`" in text  # choices from the Literal annotation
    assert config.RunConfig.__dataclass_fields__["seed"].metadata["help"] in text


def test_the_check_mode_fails_on_a_stale_page(tmp_path):
    main = runpy.run_path(str(ROOT / "scripts" / "config_reference.py"))["main"]
    page = tmp_path / "configuration.md"
    assert main(["--check", "--page", str(page)]) == 1  # missing
    assert main(["--page", str(page)]) == 0 and main(["--check", "--page", str(page)]) == 0
    page.write_text(page.read_text().replace("| `seed` |", "| `sead` |"))
    assert main(["--check", "--page", str(page)]) == 1


def test_the_generator_runs_as_a_script():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def documented_errors() -> list[tuple[str, str, str]]:
    """(page, command, error line) for every ``$ fltac ...`` line answered by one whole ``fltac: error:`` line.

    An answer wrapped over several lines or elided (``...``) illustrates a message whose details depend on
    the reader's folder; only answers that end their line (next: another ``$`` line or the block's end) are
    replayed.
    """
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = page.read_text().splitlines() + [""]
        for command, answer, after in zip(lines, lines[1:], lines[2:]):
            whole = after.startswith(("$ ", "```"))
            if command.startswith("$ fltac ") and answer.startswith("fltac: error: ") and whole:
                found.append((page.name, command, answer))
    return found


@pytest.mark.parametrize("page, command, answer", documented_errors())
def test_documented_error_messages_are_what_the_cli_prints(page, command, answer, monkeypatch, capsys):
    from fltac.cli import main

    monkeypatch.chdir(ROOT)  # the documented commands run from the repository root
    assert main(shlex.split(command)[2:]) == 2
    assert capsys.readouterr().err.strip() == answer


def test_the_readme_documents_a_config_error():
    assert any(page == "README.md" for page, _, _ in documented_errors())
