"""Server-side SVG charts: well-formed XML, escaped text, axes and empty states."""

from __future__ import annotations

from decimal import Decimal
from xml.etree import ElementTree

from kb.usage import charts
from kb.usage.charts import Series

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ElementTree.Element:
    root = ElementTree.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ElementTree.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_line_chart_has_title_axes_points_and_gaps():
    """Lines get a title, y ticks from 0, a circle per value, and break at None."""
    svg = charts.line_chart(
        title="Latency", x_labels=["01-01", "01-02", "01-03"], value_format=charts.format_ms,
        series=[Series("p50", [100, None, 300]), Series("p95", [250.5, 400, 900])],
    )
    root = parse(svg)

    assert root.find(f"{SVG}title").text == "Latency"
    labels = texts(root)
    assert "Latency" in labels and "0 ms" in labels and "1000 ms" in labels
    assert "01-01" in labels and "p95" in labels
    assert len(list(root.iter(f"{SVG}circle"))) == 5
    assert len(list(root.iter(f"{SVG}polyline"))) == 3  # p50 is split in two by the gap


def test_stacked_bars_scale_to_the_total_and_escape_text():
    """Stacked bars share one axis up to the tallest total; names are escaped, not markup."""
    svg = charts.bar_chart(
        title="Tokens <by> model & day", x_labels=["a", "b"],
        series=[Series("<script>x</script>", [Decimal("10"), 30]), Series("m2", [5, 0])],
    )
    root = parse(svg)

    assert "<script>" not in svg
    assert "Tokens <by> model & day" in texts(root)
    assert len(list(root.iter(f"{SVG}rect"))) == 2 + 3  # legend swatches + non-zero bars
    assert "30" in texts(root)  # nice ticks reach the tallest stack


def test_grouped_bars_and_hbar_ranking():
    """Grouped bars sit side by side; a ranking labels each bar with its value."""
    grouped = parse(charts.bar_chart(title="G", x_labels=["x"], stacked=False,
                                     series=[Series("a", [1]), Series("b", [2])]))
    ranking = parse(charts.hbar_chart(title="Top", labels=["alice", "bob"],
                                      values=[Decimal("1.5"), 0.25],
                                      value_format=charts.format_usd))

    widths = [float(r.get("width")) for r in grouped.iter(f"{SVG}rect")
              if r.find(f"{SVG}title") is not None]
    assert len(widths) == 2 and widths[0] == widths[1]
    assert {"alice", "bob", "$1.50", "$0.25"} <= set(texts(ranking))


def test_empty_charts_say_so():
    """No data draws a message, never a division by zero."""
    for svg in (
        charts.line_chart(title="L", x_labels=["a"], series=[Series("s", [None])]),
        charts.bar_chart(title="B", x_labels=["a", "b"], series=[Series("s", [0, 0])]),
        charts.bar_chart(title="B", x_labels=[], series=[]),
        charts.hbar_chart(title="H", labels=[], values=[]),
    ):
        assert "No data for this period" in texts(parse(svg))


def test_nice_ticks_and_formats():
    assert charts.nice_ticks(880) == [0, 200, 400, 600, 800, 1000]
    assert charts.nice_ticks(1.0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.format_number(12_345) == "12.3k"
    assert charts.format_usd(0.00027) == "$0.0003"
    assert charts.format_percent(0.125) == "12%"


def test_zero_valued_bars_with_events_show_the_note_not_no_data():
    """Calls that all cost $0 draw the axes and say how many calls there were."""
    svg = charts.bar_chart(title="Cost", x_labels=["a", "b"], series=[Series("Cost", [0, 0])],
                           value_format=charts.format_usd,
                           zero_note="245 model calls, all at no cost")
    shown = texts(parse(svg))
    assert "245 model calls, all at no cost" in shown
    assert "No data for this period" not in shown
    assert {"a", "b", "$0"} <= set(shown)
