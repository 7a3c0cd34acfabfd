"""The shape issue 18 set for the code, checked on every run (figures from
.ci/architecture_report.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("architecture_report",
                                                  ROOT / ".ci" / "architecture_report.py")
    report = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = report  # dataclasses look their module up there
    spec.loader.exec_module(report)
    return report.architecture_figures(ROOT)


def test_no_import_cycles_between_first_party_modules(figures):
    """Counting imports inside functions too: those used to hide two cycles."""
    assert figures.hidden_cycles == []


def test_no_first_party_import_inside_a_function_unless_it_says_which_cycle_it_breaks(figures):
    assert figures.inner_imports == []


def test_kb_has_at_most_twelve_top_level_modules_beside_its_subpackages(figures):
    assert len(figures.kb_top_modules) <= 12, figures.kb_top_modules


def test_no_function_is_over_80_lines(figures):
    assert figures.over(80) == []


def test_no_function_on_the_search_and_chat_paths_is_over_60_lines(figures):
    assert figures.over(60, ("search/", "chat/")) == []


# The HTTP edges and the wiring (app configs, URL confs, the ASGI entry point).
EDGES = ("kb.api", "kb.admin", "kb.urls", "kb.views", "kb.asgi", "kb.apps", "kb.usage.views",
         "kb.usage.urls", "kb.usage.api", "kb.ops.metrics_urls", "search.api", "search.urls",
         "search.golden_api", "search.admin",
         "search.apps", "chat.api", "chat.management_api", "chat.mcp", "chat.quality_views",
         "chat.views", "chat.openai_compat", "chat.urls", "chat.admin", "chat.schema",
         "chat.apps")


def _is(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_imports_point_one_way_down_the_layers(figures):
    """HTTP and wiring -> chat -> search -> kb's domain -> foundations (docs/ARCHITECTURE.md)."""
    upward = []
    for module, targets in figures.imports.items():
        if _is(module, EDGES):
            continue
        for target in targets:
            if _is(target, EDGES):
                upward.append(f"{module} -> {target} (an HTTP edge)")
            elif ((module.startswith("kb") and target.startswith(("search", "chat")))
                  or (module.startswith("search") and target.startswith("chat"))):
                upward.append(f"{module} -> {target}")
    assert upward == []
