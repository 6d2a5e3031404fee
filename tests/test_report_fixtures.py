"""The saved fixture reports: valid against the schema, and the story Python tells of them.

The TypeScript side (``labextension/test/model.test.ts``) is held to the same
file, so the sidebar and the Python renderings tell one story.
"""

from __future__ import annotations

import jsonschema
import pytest

from oomnb.model.report import Report, load_schema
from oomnb.model.units import format_bytes
from tests.report_fixtures import BYTE_CASES, load

FIXTURES = load()


def test_fixtures_cover_every_kind_of_report() -> None:
    names = [item["name"] for item in FIXTURES["reports"]]
    assert names == ["fits", "oom_measured", "oom_lower_bound", "no_limit", "oom_error_figures_only"]
    kinds = {item["name"]: item["report"]["oom"] for item in FIXTURES["reports"]}
    assert kinds["fits"] is None and kinds["oom_measured"]["needs_at_least"] is False
    assert kinds["oom_lower_bound"]["needs_at_least"] is True and kinds["oom_error_figures_only"]["needs_bytes"] is None


@pytest.mark.parametrize("item", FIXTURES["reports"], ids=lambda item: item["name"])
def test_fixture_is_valid_and_tells_its_story(item: dict) -> None:
    jsonschema.validate(item["report"], load_schema())
    report = Report.from_dict(item["report"])
    assert report.to_dict() == item["report"]
    assert report.story() == item["story"]
    assert report.headline() == item["headline"]
    if report.oom is not None:
        assert item["story"] and item["story"] in report.to_text()


def test_byte_formatting_cases() -> None:
    assert [n for n, _ in FIXTURES["format_bytes"]] == BYTE_CASES
    for n, text in FIXTURES["format_bytes"]:
        assert format_bytes(n) == text
    assert format_bytes(1179648) == "1.12 MiB"  # 1.125 MiB exactly: the tie goes to even
