"""`dbt docs` as a person reads it, in Debian's Chromium at 1280 pixels: the project's overview
on the front page, a kept-rows model with its columns described as its source describes them,
and the dedup tests that guard it. The screenshots stay in screenshots/."""

from __future__ import annotations

import html
import re
from pathlib import Path

import browser
import yaml
from conftest import PROJECT_DIR, SCREENSHOTS, Database

# dbt docs is a page that renders itself from the manifest it embeds: give its scripts time.
RENDER_MS = 8000
SOURCES = PROJECT_DIR / "models" / "staging" / "breezeway" / "_breezeway__sources.yml"


def text_of(dom: str) -> str:
    """What a page shows as text: its DOM without tags, scripts and styles, spaces folded."""
    shown = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL | re.IGNORECASE)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", shown)).split())


def source_columns(table: str) -> dict[str, str]:
    declared = yaml.safe_load(SOURCES.read_text())
    (entry,) = [t for s in declared["sources"] for t in s["tables"] if t["name"] == table]
    return {c["name"]: " ".join(c["description"].split()) for c in entry["columns"]}


def generated_docs(database: Database) -> Path:
    result = database.dbt("docs", "generate", "--static")
    assert result.success, result.exception
    page = database.target_dir / "static_index.html"
    assert page.is_file()
    return page


def test_the_front_page_is_the_projects_overview(chromium, fresh: Database) -> None:
    page = generated_docs(fresh).as_uri()
    shown = text_of(chromium.dom(page, wait_ms=RENDER_MS))
    assert "Duplicate rows removed, every original kept" in shown
    assert "Where each table is declared" in shown
    assert "dedup_reconciles_<table>" in shown
    chromium.screenshot(page, SCREENSHOTS / "dbt-docs-overview.png", wait_ms=RENDER_MS)


# A person's click on the model page's "Referenced By" tab that lists the tests, once the page
# has rendered it.
OPEN_DATA_TESTS = """
setTimeout(() => {
  [...document.querySelectorAll("a, li")]
    .filter(e => e.textContent.trim() === "Data Tests").forEach(e => e.click());
}, 4000);
"""


def test_a_kept_rows_model_shows_its_columns_and_its_dedup_tests(chromium,
                                                                 fresh: Database) -> None:
    model = "#!/model/model.dedup.property_photos"
    docs = generated_docs(fresh)
    shown = text_of(chromium.dom(docs.as_uri() + model, wait_ms=RENDER_MS))
    described = source_columns("property_photos")
    assert len(described) == 9
    for column, description in described.items():
        assert column in shown
        assert description in shown, column
    tests = ("dedup_natural_key_unique_property_photos", "dedup_reconciles_property_photos")
    assert not any(test in shown for test in tests), "the tests show before the click"
    clicked = browser.with_script(docs, OPEN_DATA_TESTS, "clicked_index.html").as_uri() + model
    shown = text_of(chromium.dom(clicked, wait_ms=RENDER_MS))
    for test in tests:
        assert test in shown
    chromium.screenshot(clicked, SCREENSHOTS / "dbt-docs-property-photos.png", height=1600,
                        wait_ms=RENDER_MS)
