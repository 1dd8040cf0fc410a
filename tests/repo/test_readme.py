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


def test_every_test_the_readme_names_exists(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    named = re.findall(r"`(tests/(?:\w+/)?test_\w+\.py)(?:::(\w+))?`", readme)
    assert named
    for path, test in named:
        source = (repo_root / path).read_text()
        if test:
            assert f"def {test}(" in source, f"{path}::{test} does not exist"
    # "…::name" continues the file named just before it in the same table cell
    for cell in re.findall(r"\| ([^|]*…::[^|]*) \|", readme):
        files = re.findall(r"(tests/(?:\w+/)?test_\w+\.py)::", cell)
        for short in re.findall(r"…::(test_\w+)", cell):
            assert any(f"def {short}(" in (repo_root / f).read_text() for f in files), short


def test_the_code_map_matches_the_tree(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    section = readme[readme.index("## Code map") :]
    mapped = set(re.findall(r"^\| `(dispatcher/[\w/]+\.py)` \|", section, re.MULTILINE))
    tree = {str(path.relative_to(repo_root)) for path in (repo_root / "dispatcher").rglob("*.py")}
    assert mapped == tree, f"only in the map: {mapped - tree}; only in the tree: {tree - mapped}"
