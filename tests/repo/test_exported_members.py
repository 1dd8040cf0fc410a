"""The public Python API is exactly what the README documents."""

from __future__ import annotations

import re
from pathlib import Path

import dispatcher


def test_all_is_the_documented_api(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    paragraph = readme[readme.index("The package's public names") :].split("\n\n", 1)[0]
    documented = re.findall(r"`([\w]+)`", paragraph.split(":", 1)[1])
    assert dispatcher.__all__ == documented
    for name in dispatcher.__all__:
        assert getattr(dispatcher, name) is not None
