"""The demo's table as the README and the benchmarks page show it (issue 26): the committed
results file is a table.md the demo wrote, with the rows and columns the demo makes now; the
README shows that file, and the numbers its prose and the benchmarks page quote come from it."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from sj_parallel_conversion.tools.compare import LABELS, ComparisonRow, ComparisonTable
from sj_parallel_conversion.tools.demo import planned_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "demo_resnet20_strongest.md"


@pytest.fixture(scope="module")
def publish():
    spec = importlib.util.spec_from_file_location("publish_demo", ROOT / "tools" / "publish_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_demo_table_has_the_rows_and_columns_the_demo_makes(publish):
    text = RESULTS.read_text()
    title, header, rows = publish.parse_table(text)
    assert title.startswith("CIFAR-10 ResNet-20 (ReLU), 256 test images")
    assert [(r["method"], r["T"]) for r in rows] == [
        (LABELS[m], "-" if T is None else str(T)) for m, T in planned_rows()], "rerun bash tools/publish_demo.sh"
    # The header and separator the demo's ComparisonTable writes today (a new column shows up here).
    today = ComparisonTable([ComparisonRow("ann", None, 0.5, 1)], title="t").to_text().splitlines()
    table = publish.table_text(text).splitlines()
    first = next(i for i, line in enumerate(table) if line.startswith("|"))
    assert [c.strip() for c in table[first].split("|")] == [c.strip() for c in today[1].split("|")]
    assert all(re.fullmatch(r"\|[-:|]+\|", line.replace(" ", "")) for line in (table[first + 1], today[2]))
    assert all(float(r["acc %"]) > 0 for r in rows)
    # The notes the demo writes under its table: what each row is, the machine and the command.
    for start in ("Parallel rows", "SJ rows", "Times:", "Machine:", "Command: sj-parallel demo"):
        assert re.search(rf"^{re.escape(start)}", text, re.M), start


def test_readme_and_benchmarks_page_show_the_committed_table(publish):
    readme = (ROOT / "README.md").read_text()
    begin, end = publish.README_MARKERS
    block = readme[readme.index(begin):readme.index(end) + len(end)]
    assert block == publish.readme_block(RESULTS.read_text())  # table (rows, format) and the sentence quoting it
    assert "```text\n" + RESULTS.read_text().strip() + "\n```" in block  # the file, notes included
    assert publish.stale() == [], "rerun python tools/publish_demo.py (or bash tools/publish_demo.sh)"
    bench = (ROOT / "docs" / "benchmarks.rst").read_text()
    assert ".. literalinclude:: results/demo_resnet20_strongest.md" in bench


def test_prose_around_the_demo_quotes_no_number_of_its_own(publish):
    """Percentages about the demo appear only inside the generated blocks."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands"):readme.index("## Use from Python")]
    begin, end = publish.README_MARKERS
    outside = section[:section.index(begin)] + section[section.index(end):]
    outside = outside.replace("99.9 % percentile", "")  # the baseline's setting, not a result
    assert not re.findall(r"\d+\.\d+ ?%", outside), re.findall(r"\d+\.\d+ ?%", outside)
    bench = (ROOT / "docs" / "benchmarks.rst").read_text()
    part = bench[bench.index("Against SpikingJelly's strongest setting"):bench.index("On 1,000 test images")]
    begin, end = publish.RST_MARKERS
    outside = part[:part.index(begin)] + part[part.index(end):]
    assert not re.findall(r"\d+(\.\d+)? ?%", outside.replace('"99.9%"', "").replace("rate-cw-99.9%", ""))


def test_publish_rewrites_both_pages_from_a_table(publish, tmp_path, monkeypatch):
    """tools/publish_demo.py on a table.md: the results file is a copy, the README block shows it."""
    table = ComparisonTable(title="CIFAR-10 ResNet-20 (ReLU), 256 test images", timed_calls=4)
    for i, (m, T) in enumerate(planned_rows()):
        table.rows.append(ComparisonRow(m, T, 0.5012 + i / 100, 256, 1.0, 2.0))
    text = table.to_text() + "\n\nCommand: sj-parallel demo\n"
    (tmp_path / "table.md").write_text(text)
    for name in ("RESULTS", "README", "BENCHMARKS"):
        original = getattr(publish, name)
        copy = tmp_path / original.name
        copy.write_text(original.read_text())
        monkeypatch.setattr(publish, name, copy)
    monkeypatch.setattr(publish, "ROOT", tmp_path)
    assert publish.main(["--table", str(tmp_path / "table.md")]) == 0
    assert (tmp_path / RESULTS.name).read_text() == text
    readme = (tmp_path / "README.md").read_text()
    assert "```text\n" + text.strip() + "\n```" in readme
    assert "the ANN scores 50.12 %" in readme and "at T = 4: parallel SNN, Algorithm 1 (count-domain) 51.12 %" in readme
    assert publish.stale() == []
    assert "at T = 32:" in (tmp_path / "benchmarks.rst").read_text()
