"""What `runner suggest-keys` prints: the candidates as rows, and the best as meta.dedup."""

from __future__ import annotations

import json
import shlex

from runner.declaration.artifacts import ANY_COPY
from runner.facts.suggest import Checked, Suggestion


def rows(suggestion: Suggestion) -> list[dict]:
    """One row per candidate, best first, with the numbers `runner audit` would show."""
    return [{
        "rank": rank,
        "natural_key": list(c.spec.natural_key),
        "nulls": c.spec.nulls,
        "alternative_key": list(c.spec.alternative_key) or None,
        "rows": c.counts.total_rows,
        "unique_rows": c.counts.unique_rows,
        "duplicate_rows": c.counts.duplicate_rows,
        "null_key_rows": c.counts.null_key_rows,
        "groups_that_differ": c.differing_groups,
        "differ_between_copies": list(c.candidate.differ_between_copies),
        "indexed": c.candidate.indexed,
        "enforced": c.candidate.enforced,
    } for rank, c in enumerate(suggestion.checked, 1)]


def as_text_rows(suggestion: Suggestion) -> list[dict]:
    """The rows for people: short headings, each list as one cell."""
    return [{
        "rank": rank,
        "natural key": ", ".join(c.spec.natural_key),
        "nulls": c.spec.nulls,
        "alternative key": ", ".join(c.spec.alternative_key),
        "rows": c.counts.total_rows,
        "kept": c.counts.unique_rows,
        "removed": c.counts.duplicate_rows,
        "NULL keys": c.counts.null_key_rows,
        "differing": c.differing_groups,
        "differ between copies": ", ".join(c.candidate.differ_between_copies),
        "indexed": "unique" if c.candidate.enforced else "yes" if c.candidate.indexed else "",
    } for rank, c in enumerate(suggestion.checked, 1)]


def meta_dedup(checked: Checked, tiebreaker: str | None) -> list[str]:
    """The candidate as the YAML lines of a source's config.meta.dedup."""
    spec = checked.spec
    lines = ["config:", "  meta:", "    dedup:",
             f"      natural_key: {json.dumps(list(spec.natural_key))}"]
    if tiebreaker:
        lines.append(f'      keep: [{{column: {tiebreaker}, order: desc}}]   # the latest copy')
    elif checked.copies_equal:
        lines.append("      keep: any   # no column breaks ties, and copies are equal in every "
                     "column")
    else:
        lines.append("      keep: [...]   # no unique NOT NULL column to end it with: add one")
    if spec.nulls != "not_distinct":
        lines.append(f"      nulls: {spec.nulls}")
    if spec.alternative_key:
        lines.append(f"      alternative_key: {json.dumps(list(spec.alternative_key))}")
    return lines


def summary(suggestion: Suggestion) -> list[str]:
    """What was set aside and looked at, before the candidates."""
    aside = [*(f"{c} (surrogate id)" for c in suggestion.surrogates),
             *(f"{c} (load time)" for c in suggestion.load_times)]
    return [f"{suggestion.relation}: candidates found in {suggestion.sampled_rows:,} sampled "
            "rows, each counted on the whole table",
            f"set aside: {', '.join(aside) or 'nothing'}"]


def add_line(suggestion: Suggestion, checked: Checked) -> str | None:
    """The `runner add` that declares the candidate, where a tie-breaker ends its keep rule or
    its copies are equal in every column."""
    keep = suggestion.tiebreaker or (ANY_COPY if checked.copies_equal else None)
    if not keep:
        return None
    spec = checked.spec
    parts = ["runner", "add", shlex.quote(str(suggestion.relation)),
             "--key", shlex.quote(",".join(spec.natural_key)),
             "--keep", shlex.quote(keep)]
    if spec.nulls != "not_distinct":
        parts += ["--nulls", spec.nulls]
    if spec.alternative_key:
        parts += ["--alternative-key", shlex.quote(",".join(spec.alternative_key))]
    return " ".join(parts)
