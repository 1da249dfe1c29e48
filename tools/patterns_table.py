"""Write docs/patterns_table.inc from the pattern table (sj_parallel_conversion.patterns).

Run after changing the table: ``python tools/patterns_table.py``; tests/test_patterns.py fails
while the file differs from the table.
"""
from pathlib import Path

from sj_parallel_conversion.patterns import table_rst

OUT = Path(__file__).resolve().parents[1] / "docs" / "patterns_table.inc"

if __name__ == "__main__":
    OUT.write_text(table_rst(), encoding="utf-8")
    print(f"wrote {OUT}")
