"""The README stays true: its setting table, its two commands, the tests it names."""

from __future__ import annotations

import re
from pathlib import Path

from dispatcher.settings import Settings


def test_every_setting_is_documented(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`DISPATCHER_{name.upper()}`" in readme, f"README misses DISPATCHER_{name.upper()}"


def test_first_lines_give_the_two_commands(repo_root: Path) -> None:
    head = (repo_root / "README.md").read_text().splitlines()[:6]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make test") for line in head)


# A test the README cites: `path` or `path::name` in full, or `…::name`, which continues the
# path cited last before it: in a table, in the same cell; in prose, anywhere above.
CITED = re.compile(r"`(tests/(?:\w+/)?test_\w+\.py)(?:::(\w+))?`|`…::(\w+)`")


def wrong_citations(readme: str, repo_root: Path) -> list[str]:
    """Each citation of a file or test that does not exist, by its line."""
    sources: dict[str, str] = {}

    def defines(path: str, test: str) -> bool:
        if path not in sources:
            sources[path] = (repo_root / path).read_text() if (repo_root / path).is_file() else ""
        return f"def {test}(" in sources[path]

    wrong = []
    last = ""  # the path cited last, in prose or in a table
    for number, line in enumerate(readme.splitlines(), 1):
        table = line.startswith("|")
        for part in line.split("|") if table else [line]:
            here = ""  # the path cited last in this cell
            for path, test, short in CITED.findall(part):
                if path:
                    last = here = path
                    if not (repo_root / path).is_file():
                        wrong.append(f"line {number}: {path} does not exist")
                    elif test and not defines(path, test):
                        wrong.append(f"line {number}: {path}::{test} does not exist")
                elif not (cited := here if table else last):
                    wrong.append(f"line {number}: …::{short} has no path cited before it")
                elif not defines(cited, short):
                    wrong.append(f"line {number}: …::{short} is not in {cited}")
    return wrong


def test_every_test_the_readme_names_exists(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    assert CITED.search(readme)
    wrong = wrong_citations(readme, repo_root)
    assert not wrong, "\n".join(wrong)


def test_the_code_map_matches_the_tree(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    section = readme[readme.index("## Code map") :]
    mapped = set(re.findall(r"^\| `(dispatcher/[\w/]+\.py)` \|", section, re.MULTILINE))
    tree = {str(path.relative_to(repo_root)) for path in (repo_root / "dispatcher").rglob("*.py")}
    assert mapped == tree, f"only in the map: {mapped - tree}; only in the tree: {tree - mapped}"
