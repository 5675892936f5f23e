"""What dbt knows, read from its artifacts: no database access here.

The natural key, keep rule and NULL policy of each live table are declared once, in the dbt YAML
of its source table; `target/manifest.json` carries them here, and `target/run_results.json` says
whether the latest build built every model the swap needs and passed every test on them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.declaration import select
from runner.errors import RunnerError
from runner.version import VERSION

DEDUPLICATED_TAG = "deduplicated"
KEY_GROUPS_TAG = "key_groups"
VERSION_MACRO = "macro.dedup.dedup_version"
# The guard of a user's CI after the swap (selectors.yml): tests of the live tables as they
# are, which say nothing of a build.
GUARD_TAG = "dedup_guard"
NULL_POLICIES = ("not_distinct", "distinct", "forbidden", "backfill")
REFERENCE_POLICIES = ("repoint", "refuse")
STRATEGIES = ("auto", "swap", "in_place")
ANY_COPY = "any"
"""meta.dedup's keep for a table whose copies of a key are equal in every column: any one may
stay. They differ only in their place in the table, ctid, which breaks their ties and which
only in place keeps."""
PASSING = {"success", "pass"}


@dataclass(frozen=True)
class Relation:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class KeepColumn:
    column: str
    descending: bool


@dataclass(frozen=True)
class DedupSpec:
    """How one live table is deduplicated, as its source declares under config.meta.dedup."""

    natural_key: tuple[str, ...]
    keep: tuple[KeepColumn, ...]
    nulls: str
    alternative_key: tuple[str, ...] = ()
    """The key of the rows whose natural key has a NULL, NULLs equal: the natural key's
    columns and those that tell such rows apart (the incident's guests without email)."""
    references: str = "repoint"
    """What a swap does with rows of other tables that point at a removed duplicate: re-point
    them at the kept row of the same key, or refuse to swap the table."""
    strategy: str = "auto"
    """How the duplicates leave the live table: a swap for a new table of the kept rows, in
    place (the removed rows archived and deleted), or whichever `runner swap` finds cheaper."""
    any_copy: bool = False
    """keep: any: a key's copies are equal in every column, ctid tells them apart, and a copy
    leaves only for one equal to it."""

    @property
    def tiebreaker(self) -> str:
        return self.keep[-1].column

    @property
    def keep_columns(self) -> tuple[str, ...]:
        """The table's columns the keep rule reads: none under keep: any, whose ctid is a
        system column."""
        return () if self.any_copy else tuple(entry.column for entry in self.keep)

    @property
    def told_apart_by(self) -> tuple[str, ...]:
        """The alternative key's columns beyond the natural key's."""
        return tuple(c for c in self.alternative_key if c not in self.natural_key)

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Every column a row's key is read from."""
        return (*self.natural_key, *self.told_apart_by)


@dataclass(frozen=True)
class DedupTarget:
    """A live table and the dbt models that replace it."""

    source: str
    """The dbt source table, as source_name.table_name."""
    live: Relation
    deduplicated: Relation
    key_groups: Relation
    spec: DedupSpec
    model_id: str

    @property
    def name(self) -> str:
        return self.live.name


def parse_spec(source_label: str, meta: dict) -> DedupSpec:
    """A source's meta.dedup, refused as the dbt macro dedup_spec_from_source refuses it, in
    its order and words: the runner reads the manifest before dbt compiles any model, and a
    test runs both on the same mistakes."""
    where = f"source {source_label}"
    spec = meta.get("dedup")
    if not isinstance(spec, dict):
        raise RunnerError(f"{where} has no meta.dedup: declare natural_key, keep and nulls under "
                          "config.meta.dedup")
    unknown = sorted(set(spec) - {"natural_key", "keep", "nulls", "alternative_key", "references",
                                  "strategy"})
    if unknown:
        raise RunnerError(f"{where}: unknown meta.dedup keys {json.dumps(unknown)}; expected "
                          "natural_key, keep, nulls, alternative_key, references, strategy")
    natural_key = spec.get("natural_key")
    if not isinstance(natural_key, list) or not natural_key or not all(
            isinstance(column, str) and column for column in natural_key):
        raise RunnerError(f"{where}: natural_key must be a non-empty list of column names, got "
                          f"{json.dumps(natural_key)}")
    keep = spec.get("keep")
    any_copy = keep == ANY_COPY
    if any_copy:
        keep = [{"column": "ctid", "order": "asc"}]
    if not isinstance(keep, list) or not keep:
        raise RunnerError(f"{where}: keep must be a non-empty list of {{column, order}} ending in "
                          f"a unique tie-breaker, or any where a key's copies are equal in every "
                          f"column, got {json.dumps(keep)}")
    keep_columns = []
    for entry in keep:
        if (not isinstance(entry, dict) or not isinstance(entry.get("column"), str)
                or entry.get("order") not in ("asc", "desc")):
            raise RunnerError(f"{where}: each keep entry needs column and order (asc or desc), "
                              f"got {json.dumps(entry)}")
        keep_columns.append(KeepColumn(entry["column"], entry["order"] == "desc"))
    nulls = spec.get("nulls", "not_distinct")
    if nulls not in NULL_POLICIES:
        raise RunnerError(f"{where}: nulls must be one of {', '.join(NULL_POLICIES)}, "
                          f"got {json.dumps(nulls)}")
    alternative_key = _alternative_key(where, spec, natural_key, nulls)
    references = spec.get("references", "repoint")
    if references not in REFERENCE_POLICIES:
        raise RunnerError(f"{where}: references must be one of {', '.join(REFERENCE_POLICIES)}, "
                          f"got {json.dumps(references)}")
    strategy = spec.get("strategy", "auto")
    if strategy not in STRATEGIES:
        raise RunnerError(f"{where}: strategy must be one of {', '.join(STRATEGIES)}, "
                          f"got {json.dumps(strategy)}")
    if strategy == "in_place" and nulls == "backfill":
        raise RunnerError(f"{where}: strategy in_place keeps rows as they are, and nulls: "
                          "backfill changes them: set strategy to swap or auto")
    if any_copy and strategy == "swap":
        raise RunnerError(f"{where}: keep: any tells equal copies apart by their place in the "
                          "table, which only in place keeps: set strategy to in_place or auto")
    if any_copy and nulls == "backfill":
        raise RunnerError(f"{where}: keep: any deduplicates in place, which keeps rows as they "
                          "are, and nulls: backfill changes them: set nulls to another policy")
    return DedupSpec(tuple(natural_key), tuple(keep_columns), nulls, alternative_key, references,
                     strategy, any_copy)


def _alternative_key(where: str, spec: dict, natural_key: list[str],
                     nulls: str) -> tuple[str, ...]:
    """meta.dedup's alternative_key, refused as the macro refuses it, after the rest."""
    alternative_key = spec.get("alternative_key", [])
    if "alternative_key" in spec and (
            not isinstance(alternative_key, list) or not all(
                isinstance(column, str) and column for column in alternative_key)
            or not set(natural_key) < set(alternative_key)):
        raise RunnerError(f"{where}: alternative_key must list every natural_key column and the "
                          "columns that tell apart rows whose natural key has a NULL, got "
                          f"{json.dumps(alternative_key)}")
    if alternative_key and nulls != "not_distinct":
        raise RunnerError(f"{where}: alternative_key makes NULLs in it equal: leave nulls out or "
                          f"set it to not_distinct, got {json.dumps(nulls)}")
    return tuple(dict.fromkeys(alternative_key))


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RunnerError(f"{path} not found: run `dbt build` first ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunnerError(f"{path} is unreadable ({error}): run `dbt build` again") from error


def _upstream(manifest: dict, node_id: str) -> set[str]:
    """Every node and source `node_id` is built from, however far up."""
    seen: set[str] = set()
    pending = [node_id]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in manifest["nodes"]:
            pending.extend(manifest["nodes"][current]["depends_on"]["nodes"])
    seen.discard(node_id)
    return seen


def _upstream_sources(manifest: dict, node_id: str) -> set[str]:
    return {found for found in _upstream(manifest, node_id) if found in manifest["sources"]}


def _why_skipped(manifest: dict, results: list[dict], node_id: str) -> str | None:
    """The failure upstream that made dbt skip `node_id`: a model that failed, or a test of
    something it is built from, with dbt's message and where its SQL is."""
    upstream = _upstream(manifest, node_id)
    for result in results:
        failed = manifest["nodes"].get(result["unique_id"])
        if result["status"] not in ("fail", "error") or failed is None:
            continue
        if result["unique_id"] in upstream or (
                failed["resource_type"] == "test"
                and upstream & set(failed["depends_on"]["nodes"])):
            where = failed.get("compiled_path")
            return (f"{failed['name']} {'failed' if result['status'] == 'fail' else 'errored'}"
                    f" ({(result.get('message') or '').strip() or 'no message'}"
                    f"{'; its query: ' + where if where else ''})")
    return None


def refuse_double_quotes(label: str, names: dict[str, str | None]) -> None:
    """dbt writes a relation's database, schema and name between double quotes without doubling
    one inside them: the SQL of every model of a table so named would break after the change
    capture had started, so the runner refuses it first."""
    for what, name in names.items():
        if name and '"' in name:
            raise RunnerError(f"source {label}: dbt writes names between double quotes without "
                              f"doubling one inside, and the {what} {name!r} holds one: rename "
                              f"the {what}")


def _relation(node: dict) -> Relation:
    return Relation(node["schema"], node.get("alias") or node.get("identifier") or node["name"])


def _check_package_version(manifest: dict, target_dir: Path) -> None:
    """The dbt package the project built with is this runner's own version: the artifacts'
    meaning (tags, key groups, tests) is the one this runner reads."""
    macro = manifest.get("macros", {}).get(VERSION_MACRO)
    found = re.search(r'return\("([^"]+)"\)', macro["macro_sql"]) if macro else None
    built_with = found.group(1) if found else "older than 0.1.0"
    if built_with != VERSION:
        raise RunnerError(f"{target_dir}/manifest.json was built with version {built_with} of "
                          f"the dbt package dedup, and this runner is {VERSION}: point "
                          "packages.yml at this runner's own (`local:` the path `runner "
                          "package-path` prints), then `dbt deps` and `dbt build` again")


def load_targets(target_dir: Path) -> list[DedupTarget]:
    """Every deduplicated model in the manifest, with the live table it replaces."""
    manifest = _load(target_dir / "manifest.json", "the runner reads dbt's manifest")
    _check_package_version(manifest, target_dir)
    targets = []
    for node_id, node in sorted(manifest["nodes"].items()):
        if node["resource_type"] != "model" or DEDUPLICATED_TAG not in node.get("tags", []):
            continue
        sources = _upstream_sources(manifest, node_id)
        if len(sources) != 1:
            raise RunnerError(f"model {node['name']} must read exactly one source table, "
                              f"reads {sorted(sources) or 'none'}")
        source = manifest["sources"][sources.pop()]
        label = f"{source['source_name']}.{source['name']}"
        meta = source.get("config", {}).get("meta") or source.get("meta") or {}
        key_groups = [
            manifest["nodes"][upstream]
            for upstream in node["depends_on"]["nodes"]
            if KEY_GROUPS_TAG in manifest["nodes"].get(upstream, {}).get("tags", [])
        ]
        if len(key_groups) != 1:
            raise RunnerError(f"model {node['name']} must read exactly one model tagged "
                              f"{KEY_GROUPS_TAG}")
        refuse_double_quotes(label, {
            "database": source.get("database"), "schema": source["schema"],
            "table": source.get("identifier") or source["name"],
            "database dbt builds into": node.get("database"),
            "schema dbt builds its kept rows into": node["schema"],
            "schema dbt builds its key groups into": key_groups[0]["schema"]})
        targets.append(
            DedupTarget(
                source=label,
                live=_relation(source),
                deduplicated=_relation(node),
                key_groups=_relation(key_groups[0]),
                spec=parse_spec(label, meta),
                model_id=node_id,
            )
        )
    if not targets:
        raise RunnerError(f"no model tagged {DEDUPLICATED_TAG} in {target_dir}/manifest.json: "
                          "run `dbt build` in the project that deduplicates your tables")
    return targets


def target_names(target: DedupTarget) -> tuple[str, ...]:
    """What a target is known by: its live table's name, its schema.table, its source."""
    return (target.live.name, target.source, str(target.live))


def select_targets(targets: list[DedupTarget], names: list[str] | None,
                   excluded: list[str] | None = None) -> list[DedupTarget]:
    """The targets named by --select (live table or source names), or all of them, but those
    --exclude names by the same names."""
    def unknown(option: str) -> Callable[[str, list[DedupTarget]], str]:
        return lambda name, all_targets: (f"{option} {name}: no deduplicated table of that "
                                          f"name; known: "
                                          f"{', '.join(t.live.name for t in all_targets)}")
    chosen = select.chosen(targets, names, target_names, unknown("--select"))
    left_out = select.chosen(targets, excluded, target_names, unknown("--exclude")) if excluded \
        else []
    kept = [target for target in chosen if target not in left_out]
    if not kept:
        raise RunnerError("--exclude leaves no table to work on: exclude fewer, or select "
                          "others")
    return kept


def built(target_dir: Path, targets: list[DedupTarget]) -> bool:
    """Whether the latest dbt run in `target_dir` built every target's deduplicated model (and
    passed or failed, which check_build says)."""
    path = target_dir / "run_results.json"
    if not path.is_file():
        return False
    ran = {result["unique_id"] for result in json.loads(path.read_text()).get("results", [])}
    return all(target.model_id in ran for target in targets)


def latest_var(target_dir: Path, name: str) -> object:
    """The dbt var `name` as the latest dbt run in `target_dir` had it (its run_results.json),
    or None."""
    try:
        return json.loads((target_dir / "run_results.json").read_text())["args"]["vars"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_build(target_dir: Path, targets: list[DedupTarget]) -> None:
    """Refuse unless the latest dbt run built each target and passed every test that guards it.

    Tests tagged GUARD_TAG are not among them, even when they ran in the same invocation: they
    say whether the live table has duplicates, which before the swap it has by design.
    """
    manifest = _load(target_dir / "manifest.json", "the runner reads dbt's manifest")
    results = _load(target_dir / "run_results.json", "the runner checks the latest build")
    run_id = results.get("metadata", {}).get("invocation_id")
    if run_id != manifest.get("metadata", {}).get("invocation_id"):
        raise RunnerError("target/manifest.json and target/run_results.json come from different "
                          "dbt runs: run `dbt build` again")
    status = {result["unique_id"]: result["status"] for result in results.get("results", [])}
    for target in targets:
        guarded = {target.model_id} | set(manifest["nodes"][target.model_id]["depends_on"]["nodes"])
        guarded |= _upstream_sources(manifest, target.model_id)
        needed = [target.model_id] + [
            node_id
            for node_id, node in manifest["nodes"].items()
            if node["resource_type"] == "test"
            and GUARD_TAG not in node.get("tags", [])
            and guarded & set(node["depends_on"]["nodes"])
        ]
        for node_id in needed:
            name = manifest["nodes"][node_id]["name"]
            if node_id not in status:
                raise RunnerError(f"{name} did not run in the latest dbt invocation: run "
                                  f"`dbt build` (it must build and test {target.live.name})")
            if status[node_id] not in PASSING:
                cause = (_why_skipped(manifest, results.get("results", []), node_id)
                         if status[node_id] == "skipped" else None)
                said = (f"was skipped in the latest dbt build because {cause}" if cause
                        else f"has status {status[node_id]} in the latest dbt build")
                raise RunnerError(f"{name} {said}: fix it and run `dbt build` again before "
                                  f"swapping {target.live.name}")
