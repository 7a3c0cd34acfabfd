"""Every environment variable kb/settings.py reads has a row in README's configuration table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def expand(cell: str) -> set[str]:
    """`KB_BUDGET_{GLOBAL,USER}_DAILY_TOKENS` names each variable the braces stand for."""
    match = re.search(r"\{([^}]*)\}", cell)
    if not match:
        return {cell}
    return {name for option in match.group(1).split(",")
            for name in expand(cell[:match.start()] + option + cell[match.end():])}


def test_every_setting_is_in_the_readme_table():
    settings = (ROOT / "kb" / "settings.py").read_text()
    read = set(re.findall(r'env_(?:str|bool|int|float|list)\(\s*["\']([A-Z][A-Z0-9_]+)["\']',
                          settings))
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## How a request flows")]
    listed: set[str] = set()
    for cell in re.findall(r"`([A-Z][A-Z0-9_{},]+(?:\.\.\.[A-Z_]+)?)`", table):
        listed |= expand(cell)
    # "`KB_BUDGET_{...}_DAILY_TOKENS` / `..._DAILY_COST_USD`": the second shares the prefix.
    for row in re.findall(r"`([A-Z_]+)\{([^}]*)\}_[A-Z_]+` / `\.\.\.(_[A-Z_]+)`", table):
        listed |= {f"{row[0]}{option}{row[2]}" for option in row[1].split(",")}
    assert read, "no env_* calls found in kb/settings.py"
    assert sorted(read - listed) == []
