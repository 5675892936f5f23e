"""The `runner` command: a thin layer over the library. Errors become one line and exit 1."""

from __future__ import annotations

import csv
import functools
import io
import json
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import click
import psycopg
from rich.console import Console
from rich.table import Table

from runner import demo, progress
from runner.declaration import artifacts, scaffold
from runner.declaration.dbt import DbtFlags, log_file, outcome, run_dbt
from runner.declaration.project import bundled_project, copy_bundled_project
from runner.errors import CHECKS_FAILED, RunnerError, from_database
from runner.execution import locking
from runner.facts import audit, preview, report, suggest, upsert, verify
from runner.jobs import capturing, cleanup, rollback, scaffolding, swap
from runner.present import audit_view, preview_view, report_view, suggest_view
from runner.server import captures, catalog, swap_log
from runner.server.connection import (
    chosen_variables,
    configured_by,
    connect,
    database,
    environment,
    uses_embedded,
)
from runner.server.embedded import EmbeddedPostgres, default_data_dir
from runner.units import duration_text, parse_duration, size_text

# Off a terminal rich would assume 80 columns and squeeze the table.
console = Console(width=None if sys.stdout.isatty() else 120)
DEMO_SCALE = 0.01
# Where `runner demo` outside a dbt project puts the one this package ships.
DEMO_PROJECT = "runner-demo"


def _failure(error: RunnerError) -> click.ClickException:
    """The error as click prints it, with the exit status of its kind."""
    failure = click.ClickException(str(error))
    failure.exit_code = error.exit_code
    return failure


def _reports(command):
    """-q, -v and --log-format, for every command: how it says what it is doing."""
    @click.option("-q", "--quiet", "verbosity", flag_value=progress.QUIET,
                  help="Say nothing on stderr but errors.")
    @click.option("-v", "--verbose", "verbosity", flag_value=progress.VERBOSE,
                  help="Say every step on stderr, not only those that take a while.")
    @click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                  show_default=True, help="What stderr says, as text or one JSON object a line.")
    @functools.wraps(command)
    def wrapper(*args, verbosity: int | None, log_format: str, **kwargs):
        level = progress.NORMAL if verbosity is None else verbosity
        with progress.reporting(level, log_format == "json"):
            return command(*args, **kwargs)
    return wrapper


def _fails_cleanly(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except psycopg.Error as error:
            raise _failure(from_database(error)) from error
        except RunnerError as error:
            raise _failure(error) from error

    return wrapper


class Duration(click.ParamType):
    """A duration with its unit (runner.units.parse_duration), at least `shortest`."""

    name = "duration"

    def __init__(self, shortest: timedelta = timedelta(0), why: str = "") -> None:
        self.shortest, self.why = shortest, why

    def convert(self, value, param, ctx) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            duration = parse_duration(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        if duration < self.shortest:
            self.fail(f"{value!r} is less than {self.shortest // timedelta(milliseconds=1)} ms"
                      f"{self.why}", param, ctx)
        return duration


def _ms(duration: timedelta) -> int:
    return round(duration / timedelta(milliseconds=1))


# 0 is no timeout at all to PostgreSQL: every session would queue behind the runner's lock.
A_TIMEOUT = Duration(timedelta(milliseconds=1), ", which PostgreSQL would read as no timeout "
                     "at all: give 1ms or more")


project_dir_option = click.option(
    "--project-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
    show_default=True, help="The dbt project.",
)


def connection_options(command):
    """Which database, as psql is told: a connection string or URI, or its parts. Each sets
    the libpq variable it stands for, for the command alone."""
    @click.option("--dsn", metavar="CONNINFO",
                  help="A libpq connection string or URI (host=... dbname=..., or "
                       "postgresql://...); -h/-p/-U/-d override its parts.")
    @click.option("-h", "--host", help="The server's host or socket directory (PGHOST).")
    @click.option("-p", "--port", type=click.IntRange(1, 65535), help="Its port (PGPORT).")
    @click.option("-U", "--username", help="The role to connect as (PGUSER).")
    @click.option("-d", "--dbname", help="The database (PGDATABASE).")
    @functools.wraps(command)
    def wrapper(*args, dsn: str | None, host: str | None, port: int | None,
                username: str | None, dbname: str | None, **kwargs):
        try:
            chosen = chosen_variables(dsn, host, port, username, dbname)
        except RunnerError as error:
            raise click.BadParameter(str(error), param_hint="'--dsn'") from error
        with environment(chosen):
            return command(*args, **kwargs)
    return wrapper


target_path_option = click.option(
    "--target-path", type=click.Path(file_okay=False, path_type=Path), envvar="DBT_TARGET_PATH",
    help="Where dbt wrote its artifacts, as dbt's own option [default: PROJECT_DIR/target].",
)


scale_option = click.option(
    "--scale", type=float, default=DEMO_SCALE, show_default=True,
    help="1.0 is the incident's 38 million child rows.")
select_option = click.option(
    "--select", "select", multiple=True,
    help="Only these live tables (repeatable); all of them by default.")
exclude_option = click.option(
    "--exclude", "exclude", multiple=True,
    help="Leave these live tables out (repeatable), named as --select names them.")
swapped_select_option = click.option(
    "--select", "select", multiple=True,
    help="Only these live tables (repeatable); by default every table whose latest swap was "
         "not rolled back.")
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Print every statement, in order; change nothing.")
lock_timeout_option = click.option(
    "--lock-timeout", type=A_TIMEOUT, default="100ms", show_default=True,
    help="How long one try waits for a lock: the longest anyone queues behind the runner.")
lock_wait_option = click.option(
    "--lock-wait", type=Duration(), default="60s", show_default=True,
    help="How long all tries together may take before giving up with no change.")
postpone_option = click.option(
    "--postpone-cut-over", "postpone", type=click.Path(dir_okay=False, path_type=Path),
    help="While this file exists, keep catching up with the ETL instead of taking the lock; "
         "delete it to cut over (--lock-wait counts from then). The transaction stays open "
         "meanwhile, which holds back vacuum.")
archive_schema_option = click.option(
    "--archive-schema", default=swap_log.DEFAULT_ARCHIVE_SCHEMA, show_default=True,
    help="Where the original tables are kept, with every row they had.")


def dbt_flags_options(command):
    """dbt's --profiles-dir, --target and --vars, for a command that may run dbt, passed on as
    one DbtFlags."""
    @click.option("--profiles-dir", type=click.Path(file_okay=False, path_type=Path),
                  envvar="DBT_PROFILES_DIR",
                  help="Where dbt finds profiles.yml, as dbt's own option [default: the project "
                       "if it has one, else dbt's: the working directory, then ~/.dbt].")
    @click.option("--target", "dbt_target", help="The profile's target, as dbt's own option.")
    @click.option("--vars", "dbt_vars",
                  help="The project's variables, as dbt's own option: '{key: value}'.")
    @functools.wraps(command)
    def wrapper(*args, profiles_dir: Path | None, dbt_target: str | None,
                dbt_vars: str | None, **kwargs):
        return command(*args, dbt_flags=DbtFlags(profiles_dir, dbt_target, dbt_vars), **kwargs)

    return wrapper


def _target_dir(project_dir: Path, target_path: Path | None) -> Path:
    """Where dbt writes its artifacts, absolute: dbt reads a relative one from the project."""
    if target_path is None:
        return (project_dir / "target").absolute()
    return target_path if target_path.is_absolute() else (project_dir / target_path).absolute()


def _configured_targets(project_dir: Path, target_dir: Path, select: tuple[str, ...],
                        dbt_flags: DbtFlags,
                        exclude: tuple[str, ...] = ()) -> list[artifacts.DedupTarget]:
    """The tables the dbt YAML configures; without a manifest `dbt parse` writes one first,
    with the user's dbt flags, which needs no database and builds nothing."""
    if not (target_dir / "manifest.json").is_file():
        run_dbt(["parse"], project_dir, target_dir=target_dir, flags=dbt_flags, quiet=True)
    return artifacts.select_targets(artifacts.load_targets(target_dir), list(select) or None,
                                    list(exclude))


output_format_option = click.option(
    "--format", "output_format", type=click.Choice(["table", "json", "csv"]), default="table",
    show_default=True, help="A readable table, or JSON or CSV for machines.")


def _emit(title: str, rows: list[dict], output_format: str) -> None:
    """Rows of one shape on stdout: a table for people, JSON or CSV for machines."""
    if output_format == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
    elif output_format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(buffer.getvalue(), nl=False)
    else:
        table = Table(title=title)
        for header in rows[0] if rows else []:
            numeric = all(isinstance(row[header], (int, float)) for row in rows)
            table.add_column(header, justify="right" if numeric else "left")
        for row in rows:
            table.add_row(*(f"{value:,}" if isinstance(value, int) and not isinstance(value, bool)
                            else "" if value is None else str(value) for value in row.values()))
        console.print(table)


@click.group(context_settings={"help_option_names": ["--help"]},
             epilog="Exit status: 0 done; 1 checks failed (runner verify); 2 bad usage of the "
                    "command line; 3 no connection to PostgreSQL, or it went; 4 refused, "
                    "nothing changed; 5 PostgreSQL stopped the command.")
@click.version_option(package_name="pg-dedup-runner", message="runner %(version)s")
def cli() -> None:
    """Deduplicate PostgreSQL tables with dbt, then swap the clean tables in safely.

    The database is the one libpq's variables choose (PGHOST, PGHOSTADDR, PGPORT, PGUSER,
    PGDATABASE or PGSERVICE, read as psql reads them); with none of them set, an embedded
    PostgreSQL server of its own, with its data under .runner/ in the project.
    """


def _rows(result: swap.SwapResult, plan) -> tuple[int, int]:
    """The rows before and after as they were at the swap's commit."""
    return result.rows.get(plan.target.live, (plan.counts.rows, plan.counts.keys))


def _print_summary(result: swap.SwapResult, sizes: dict[str, tuple[int, int]]) -> None:
    schemas = sorted({str(p.target.live.schema) for p in result.plans})
    table = Table(title=f"runner swap: {', '.join(schemas)}")
    for header in ("table", "action", "rows before", "rows after", "removed", "size before",
                   "size after"):
        table.add_column(header, justify="left" if header in ("table", "action") else "right")
    for plan in result.plans:
        before, after = sizes.get(plan.target.live.name, (0, 0))
        rows_before, rows_after = _rows(result, plan)
        table.add_row(
            plan.target.live.name, plan.action, f"{rows_before:,}", f"{rows_after:,}",
            f"{rows_before - rows_after:,}", size_text(before), size_text(after),
        )
    console.print(table)
    archives = [str(p.archive) for p in result.plans if p.archive and p.action == "swap"]
    removed = [str(p.archive) for p in result.plans if p.action == "in_place"]
    if archives or removed:
        click.echo(f"Live tables locked for {result.lock_ms:.0f} ms.")
    if archives:
        click.echo(f"Every original row is kept in {', '.join(archives)}; writes from now on "
                   "are captured, for a rollback, until `runner cleanup` or `runner capture "
                   "--stop`.")
    if removed:
        click.echo(f"Deduplicated in place: the rows removed are kept in {', '.join(removed)}, "
                   "for a rollback, until `runner cleanup`; the table's files keep their size "
                   "until VACUUM FULL, later inserts reuse the room.")
    for r, rows in result.repointed.items():
        click.echo(f"Re-pointed {rows:,} rows of {r.reference.table} (foreign key "
                   f"{r.reference.constraint}) at the kept rows of {r.live}; where each pointed "
                   f"is kept in {r.record}, for a rollback.")
    for note in result.notes:
        click.echo(f"Note: {note}")


def _sizes(conn, result: swap.SwapResult) -> dict[str, tuple[int, int]]:
    sizes = {}
    for plan in result.plans:
        after = catalog.relation_size(conn, plan.target.live)
        before = (catalog.relation_size(conn, plan.archive)
                  if plan.archive and plan.action == "swap" else after)
        sizes[plan.target.live.name] = (before, after)
    return sizes


def _progress() -> Callable[[str], None]:
    """Tell the user, on stderr, about the steps that take a while and about the lock; with
    -v, about every step."""
    last = [time.perf_counter()]
    said: set[str] = set()

    def step_done(label: str) -> None:
        now = time.perf_counter()
        took, last[0] = now - last[0], now
        if label == "cut-over postponed":
            # Once, not every second it goes on catching up.
            if label not in said:
                progress.say("postponed", "cut-over postponed: catching up until the file is "
                             "gone")
            said.add(label)
            return
        level = (progress.NORMAL if took >= 0.5 or label in ("lock", "cutover")
                 else progress.VERBOSE)
        progress.say("step", f"{label or 'step'}: {took:.1f} s", level, step=label or "step",
                     seconds=round(took, 3))

    return step_done


def _swap(options: swap.SwapOptions, dry_run: bool, output_format: str = "table") -> None:
    with connect() as conn:
        plans = swap.make_plans(conn, options)
        if dry_run:
            click.echo(swap.render(conn, plans, options))
            return
        result = swap.execute(conn, plans, options,
                              after_step=_progress() if output_format == "table" else None)
        sizes = _sizes(conn, result)
        if output_format == "json":
            click.echo(json.dumps(_as_data(result, sizes), indent=2))
        elif output_format == "csv":
            # One flat row per table: the rows re-pointed in all tables that reference it.
            _emit("", [{**table, "repointed": sum(r["rows"] for r in table["repointed"])}
                       for table in _as_data(result, sizes)["tables"]], "csv")
        elif all(p.action == "nothing" for p in plans):
            click.echo("Nothing to do: every table is deduplicated and its natural key enforced.")
        else:
            _print_summary(result, sizes)


def _as_data(result: swap.SwapResult, sizes: dict[str, tuple[int, int]]) -> dict:
    return {
        "lock_ms": round(result.lock_ms, 1),
        "lock_attempts": result.attempts,
        "replayed_writes": result.replayed,
        "notes": result.notes,
        "tables": [
            {
                "table": str(plan.target.live), "action": plan.action, "why": plan.why,
                "rows_before": _rows(result, plan)[0], "rows_after": _rows(result, plan)[1],
                "removed": _rows(result, plan)[0] - _rows(result, plan)[1],
                "bytes_before": sizes[plan.target.live.name][0],
                "bytes_after": sizes[plan.target.live.name][1],
                "archive": str(plan.archive) if plan.archive else None,
                "constraint": plan.constraint or None,
                "repointed": [
                    {"foreign_key": r.reference.constraint, "table": str(r.reference.table),
                     "rows": rows, "record": str(r.record)}
                    for r, rows in result.repointed.items() if r.live == plan.target.live],
            }
            for plan in result.plans
        ],
    }


@cli.command(name="swap")
@project_dir_option
@connection_options
@target_path_option
@select_option
@exclude_option
@dry_run_option
@lock_timeout_option
@lock_wait_option
@postpone_option
@archive_schema_option
@output_format_option
@_fails_cleanly
@_reports
def swap_command(project_dir: Path, target_path: Path | None, select: tuple[str, ...],
                 exclude: tuple[str, ...], dry_run: bool, lock_timeout: timedelta,
                 lock_wait: timedelta, postpone: Path | None, archive_schema: str,
                 output_format: str) -> None:
    """Swap the tables `dbt build` deduplicated into the live schema and add their UNIQUE
    constraints, all in one transaction; refuses unless the latest build passed."""
    options = swap.SwapOptions(
        target_dir=_target_dir(project_dir, target_path), select=list(select) or None,
        exclude=list(exclude), archive_schema=archive_schema, lock_timeout_ms=_ms(lock_timeout),
        lock_wait_s=lock_wait.total_seconds(), postpone=postpone,
    )
    with database(project_dir, changes=not dry_run):
        _swap(options, dry_run, output_format)


@cli.command(name="plan")
@project_dir_option
@connection_options
@target_path_option
@dbt_flags_options
@select_option
@exclude_option
@lock_timeout_option
@lock_wait_option
@_fails_cleanly
@_reports
def plan_command(project_dir: Path, target_path: Path | None, dbt_flags: DbtFlags,
                 select: tuple[str, ...], exclude: tuple[str, ...], lock_timeout: timedelta,
                 lock_wait: timedelta) -> None:
    """What `runner swap` would do: what it locks and for how long, then every statement.
    Before `runner capture` and `dbt build`, what it would do to each table, from the catalog,
    the YAML and one scan of each (without a manifest this runs `dbt parse`)."""
    options = swap.SwapOptions(
        target_dir=_target_dir(project_dir, target_path), select=list(select) or None,
        exclude=list(exclude),
        lock_timeout_ms=_ms(lock_timeout), lock_wait_s=lock_wait.total_seconds(),
    )
    with database(project_dir):
        targets = _configured_targets(project_dir, options.target_dir, select, dbt_flags,
                                      exclude)
        missing = _not_yet(options, targets)
        if missing is None:
            _swap(options, dry_run=True)
            return
        with connect() as conn:
            click.echo("\n".join(preview_view.lines(preview.preview(conn, targets), missing,
                                                    size_text)))


def _not_yet(options: swap.SwapOptions, targets: list[artifacts.DedupTarget]) -> str | None:
    """What the swap still waits for, in words: a capture, a build; None when neither."""
    with connect() as conn:
        captured = {r.capture.live for r in captures.registered_captures(
            conn, options.archive_schema) if r.trigger is not None}
    waiting = [*(["`runner capture`"] if any(t.live not in captured for t in targets)
                 else []),
               *(["`dbt build`"] if not artifacts.built(options.target_dir, targets) else [])]
    return f"before {' and '.join(waiting)}" if waiting else None


@cli.command(name="capture")
@project_dir_option
@connection_options
@target_path_option
@dbt_flags_options
@select_option
@exclude_option
@archive_schema_option
@lock_timeout_option
@lock_wait_option
@click.option("--status", "show_status", is_flag=True,
              help="Show every capture: what it watches, since when, how much it logged.")
@click.option("--stop", is_flag=True,
              help="Remove the captures (--select: of these tables) with all they made; a "
                   "swap whose capture is stopped can no longer be rolled back.")
@output_format_option
@_fails_cleanly
@_reports
def capture_command(project_dir: Path, target_path: Path | None, dbt_flags: DbtFlags,
                    select: tuple[str, ...], exclude: tuple[str, ...], archive_schema: str,
                    lock_timeout: timedelta, lock_wait: timedelta, show_status: bool,
                    stop: bool, output_format: str) -> None:
    """Start capturing writes to the live tables; run it before `dbt build`.

    The swap replays what the ETL writes between the build and its commit, so nothing is lost
    while the ETL keeps running, then captures the writes to the new table, so that a rollback
    knows them. All tables are captured in one transaction, or none. The tables come from
    dbt's manifest (`dbt parse` writes one, with your --vars; without a manifest this runs
    `dbt parse` itself).
    """
    if show_status and stop:
        raise click.UsageError("--status and --stop exclude each other")
    if exclude and (show_status or stop):
        raise click.UsageError("--exclude leaves tables out of a capture to start, not of "
                               "--status or --stop")
    options = locking.LockOptions(archive_schema, _ms(lock_timeout),
                                  lock_wait.total_seconds())
    with database(project_dir, changes=not show_status):
        if show_status:
            with connect() as conn:
                found = capturing.status(conn, archive_schema)
            _emit("runner capture --status", [s.as_row() for s in found], output_format)
            return
        if stop:
            with connect() as conn:
                stopped = capturing.stop(conn, list(select) or None, options)
            for state in stopped:
                _say_stopped(state)
            return
        targets = _configured_targets(project_dir, _target_dir(project_dir, target_path), select,
                                      dbt_flags, exclude)
        with connect() as conn:
            result = capturing.start(conn, targets, options)
    _say_started(result)
    click.echo("Change capture is on; now run `dbt build`, then `runner swap`.")


def _say_started(result: capturing.Started) -> None:
    for registered in result.already:
        if registered.capture.since_swap_of:
            click.echo(f"{registered.capture.live}: captured since its swap, for a rollback; "
                       "nothing to start.")
    if result.started:
        click.echo(f"Capturing writes to {', '.join(str(t) for t in result.started)}.")


@cli.command(name="build")
@project_dir_option
@connection_options
@target_path_option
@dbt_flags_options
@select_option
@exclude_option
@archive_schema_option
@lock_timeout_option
@lock_wait_option
@_fails_cleanly
@_reports
def build_command(project_dir: Path, target_path: Path | None, dbt_flags: DbtFlags,
                  select: tuple[str, ...], exclude: tuple[str, ...], archive_schema: str,
                  lock_timeout: timedelta, lock_wait: timedelta) -> None:
    """The two steps before `runner swap` as one: capture the live tables whose writes no
    capture logs yet, then `dbt build` what deduplicates them (with --select, their sources
    and everything downstream; else the project's default selector)."""
    options = locking.LockOptions(archive_schema, _ms(lock_timeout),
                                  lock_wait.total_seconds())
    target_dir = _target_dir(project_dir, target_path)
    with database(project_dir, changes=True):
        # Parsed afresh: the build must deduplicate the tables the YAML declares now. With
        # what the build before chose in place: dbt, finding its variables unchanged, then
        # parses again only the files that changed, here and in a build that chooses alike.
        chosen_before = artifacts.latest_var(target_dir, scaffold.IN_PLACE_VAR)
        run_dbt(["parse"], project_dir, target_dir=target_dir, quiet=True,
                flags=dbt_flags.with_vars({scaffold.IN_PLACE_VAR: chosen_before
                                           if isinstance(chosen_before, list) else []}))
        targets = artifacts.select_targets(artifacts.load_targets(target_dir),
                                           list(select) or None, list(exclude))
        with connect() as conn:
            _say_started(capturing.start(conn, targets, options))
            in_place = _in_place_by_auto(conn, targets)
        chosen = (["--select", *(f"source:{t.source}+" for t in targets),
                   "--exclude", f"tag:{artifacts.GUARD_TAG}"] if select or exclude else [])
        run_dbt(["build", *chosen], project_dir, target_dir=target_dir,
                flags=dbt_flags.with_vars({scaffold.IN_PLACE_VAR: in_place}))
    click.echo("Built; now run `runner swap --dry-run` to read what the swap will do, then "
               "`runner swap`.")


def _in_place_by_auto(conn, targets: list[artifacts.DedupTarget]) -> list[str]:
    """The tables under `strategy: auto` that the swap would deduplicate in place, by the
    audit's count of them now: their kept rows are built as a view, not copied."""
    auto = [t for t in targets if t.spec.strategy == "auto"]
    chosen = [p for p in preview.preview(conn, auto) if p.action == "in_place" and not p.refused]
    for planned in chosen:
        progress.say("build", f"{planned.target.source}: deduplicated in place, because "
                              f"{planned.why}: its kept rows are a view, not a copy")
    return [planned.target.source for planned in chosen]


def _say_stopped(state: capturing.CaptureStatus) -> None:
    registered = state.registered
    changes = "its log was gone" if state.changes is None else (
        f"{state.changes:,} logged changes dropped")
    click.echo(f"Stopped capturing writes to {registered.capture.live} ({changes}).")
    if registered.capture.since_swap_of:
        click.echo(f"  Its swap can no longer be rolled back; the original rows stay in "
                   f"{registered.capture.log.schema}.{registered.capture.since_swap_of} until "
                   "`runner cleanup`.")


@cli.command()
@scale_option
@click.option("--replace", is_flag=True, help="Drop the demo schema first if it exists.")
@click.option("--table", "tables", multiple=True,
              help="Only this child table (repeatable); all of them by default.")
@project_dir_option
@connection_options
@_fails_cleanly
@_reports
def generate(scale: float, replace: bool, tables: tuple[str, ...], project_dir: Path) -> None:
    """Create the demo schema `breezeway` with duplicates the way the ETL made them."""
    chosen = [table.name for table in demo.child_tables(list(tables))]
    with database(project_dir, changes=True), connect() as conn:
        started = time.perf_counter()
        demo.generate(conn, scale, replace=replace, tables=chosen)
        counts = demo.expected_counts(scale)
        total = sum(counts[name].total for name in chosen)
        click.echo(f"Generated {total:,} child rows at scale {scale} in "
                   f"{time.perf_counter() - started:.1f} s.")


@cli.command(name="demo")
@scale_option
@project_dir_option
@connection_options
@target_path_option
@_fails_cleanly
@_reports
def demo_command(scale: float, project_dir: Path, target_path: Path | None) -> None:
    """The whole job on the embedded server: demo data, dbt build, runner swap, summary.
    Outside a dbt project, the one this package ships is copied to ./runner-demo first."""
    if not uses_embedded():
        raise RunnerError("runner demo replaces the breezeway schema, so it only runs on the "
                          f"embedded server: unset {', '.join(configured_by())} (or use "
                          "`runner generate` deliberately)")
    if not (project_dir / "dbt_project.yml").is_file():
        project_dir = copy_bundled_project(project_dir / DEMO_PROJECT)
        progress.say("project", f"the demo's dbt project, copied to {project_dir}")
    timings = {}
    with database(project_dir, changes=True):
        target_dir = _target_dir(project_dir, target_path)
        with connect() as conn:
            started = time.perf_counter()
            demo.generate(conn, scale, replace=True)
            timings["generate demo data"] = time.perf_counter() - started
            run_dbt(["parse"], project_dir, target_dir=target_dir, quiet=True)
            capturing.start(conn, artifacts.load_targets(target_dir),
                            locking.LockOptions(swap_log.DEFAULT_ARCHIVE_SCHEMA))
        started = time.perf_counter()
        built = run_dbt(["build"], project_dir, target_dir=target_dir, quiet=True)
        timings["dbt build"] = time.perf_counter() - started
        click.echo(f"dbt build: {outcome(built)} (its log: {log_file(project_dir)})")
        started = time.perf_counter()
        _swap(swap.SwapOptions(target_dir=target_dir), dry_run=False)
        timings["runner swap"] = time.perf_counter() - started
    click.echo("  ".join(f"{step}: {seconds:.1f} s" for step, seconds in timings.items()))


@cli.command(name="rollback")
@project_dir_option
@connection_options
@swapped_select_option
@dry_run_option
@lock_timeout_option
@lock_wait_option
@postpone_option
@archive_schema_option
@_fails_cleanly
@_reports
def rollback_command(project_dir: Path, select: tuple[str, ...], dry_run: bool,
                     lock_timeout: timedelta, lock_wait: timedelta, postpone: Path | None,
                     archive_schema: str) -> None:
    """Put the original tables back, duplicates included, with every row written since the
    swap; the deduplicated tables are kept in the archive schema, all in one transaction."""
    options = rollback.RollbackOptions(
        select=list(select) or None, archive_schema=archive_schema,
        lock_timeout_ms=_ms(lock_timeout), lock_wait_s=lock_wait.total_seconds(),
        postpone=postpone,
    )
    with database(project_dir, changes=not dry_run), connect() as conn:
        plans = rollback.make_plans(conn, options)
        if dry_run:
            click.echo(rollback.render(conn, plans, options))
            return
        result = rollback.execute(conn, plans, options, after_step=_progress())
    click.echo("\n".join(rollback.report(result)))


@cli.command(name="cleanup")
@project_dir_option
@connection_options
@click.option("--older-than", type=Duration(), required=True,
              help="Drop only what swaps older than this kept: 7d, 12h, 30min, 0s.")
@dry_run_option
@lock_timeout_option
@lock_wait_option
@archive_schema_option
@_fails_cleanly
@_reports
def cleanup_command(project_dir: Path, older_than: timedelta, dry_run: bool,
                    lock_timeout: timedelta, lock_wait: timedelta, archive_schema: str) -> None:
    """Drop the archives, kept-row tables and rolled-back copies of the swaps older than
    --older-than; those swaps can no longer be rolled back."""
    options = locking.LockOptions(
        archive_schema=archive_schema, lock_timeout_ms=_ms(lock_timeout),
        lock_wait_s=lock_wait.total_seconds(),
    )
    with database(project_dir, changes=not dry_run), connect() as conn:
        items = cleanup.plan_cleanup(conn, archive_schema, older_than)
        if not items:
            click.echo(f"Nothing to clean up: no swap older than {duration_text(older_than)} "
                       "kept anything.")
            return
        if dry_run:
            click.echo(cleanup.render(conn, items, options))
            return
        result = cleanup.execute(conn, items, options)
    for relation, size in result.freed:
        click.echo(f"Dropped {relation} ({size_text(size)}).")
    for item in result.items:
        if item.capture is not None:
            click.echo(f"Stopped capturing writes to {item.entry.live}: its swap can no longer "
                       "be rolled back.")
    total = sum(size for _, size in result.freed)
    click.echo(f"Freed {size_text(total)} ({total:,} bytes) in total from {len(result.freed)} "
               f"tables, kept by {len(result.items)} swaps older than {duration_text(older_than)}.")


@cli.command(name="verify")
@project_dir_option
@connection_options
@target_path_option
@dbt_flags_options
@select_option
@exclude_option
@archive_schema_option
@click.option("--sample", type=click.IntRange(min=1), default=100, show_default=True,
              help="Existing rows replayed through the ETL's statement, which must add none.")
@lock_timeout_option
@output_format_option
@_fails_cleanly
@_reports
def verify_command(project_dir: Path, target_path: Path | None, dbt_flags: DbtFlags,
                   select: tuple[str, ...], exclude: tuple[str, ...], archive_schema: str,
                   sample: int, lock_timeout: timedelta, output_format: str) -> None:
    """Check the live tables after a swap: no duplicate or forbidden NULL key, the natural
    key's constraint and every index valid, foreign keys validated, sequences ahead of their
    columns, size against the swap, and the ETL's statement adding no row. Exit 1 if any
    check fails, for CI and monitoring. Changes nothing; the replay advances sequences."""
    options = verify.VerifyOptions(archive_schema=archive_schema, sample=sample,
                                   lock_timeout_ms=_ms(lock_timeout))
    with database(project_dir):
        targets = _configured_targets(project_dir, _target_dir(project_dir, target_path), select,
                                      dbt_flags, exclude)
        with connect() as conn:
            results = verify.verify(conn, targets, options)
    _emit("runner verify", [result.as_row() for result in results], output_format)
    failed = sum(not result.ok for result in results)
    if failed:
        click.echo(f"{failed} of {len(results)} checks failed: fix what each FAIL row says, "
                   "then run `runner verify` again.", err=True)
        sys.exit(CHECKS_FAILED)
    click.echo(f"All {len(results)} checks passed.", err=True)


@cli.command(name="upsert-sql")
@click.argument("table")
@click.option("--touch", multiple=True,
              help="A column set to now() on insert and on update, such as last_sync_time "
                   "(repeatable).")
@click.option("--placeholders", type=click.Choice(upsert.PLACEHOLDER_STYLES), default="psycopg",
              show_default=True,
              help="How the ETL's driver writes a parameter: psycopg's %(column)s, numbered $1 "
                   "(asyncpg, node-postgres, pgx, PREPARE), jdbc's ?, or named :column "
                   "(SQLAlchemy's text()).")
@project_dir_option
@connection_options
@target_path_option
@dbt_flags_options
@_fails_cleanly
@_reports
def upsert_sql_command(table: str, touch: tuple[str, ...], placeholders: str,
                       project_dir: Path, target_path: Path | None, dbt_flags: DbtFlags) -> None:
    """Print the INSERT ... ON CONFLICT ... DO UPDATE the ETL should load TABLE with (a live
    table, source or schema.table), on the constraint that enforces its natural key now (one
    per shape of key, each saying which rows it takes, for a table with an alternative key)."""
    with database(project_dir):
        targets = _configured_targets(project_dir, _target_dir(project_dir, target_path), (),
                                      dbt_flags)
        with connect() as conn:
            upserts = upsert.target_upserts(conn, upsert.one_target(targets, table), touch,
                                            placeholders)
            for shaped in upserts:
                said = f"-- for {shaped.rows}:\n" if len(upserts) > 1 else ""
                if placeholders in ("numbered", "jdbc"):
                    said += "-- parameters, in order: " + ", ".join(
                        f"${n} {c}" if placeholders == "numbered" else c
                        for n, c in enumerate(shaped.parameters, 1)) + "\n"
                click.echo(f"{said}{shaped.statement.as_string(conn)}"
                           f"{';' if len(upserts) > 1 else ''}")


@cli.command(name="report")
@project_dir_option
@connection_options
@swapped_select_option
@archive_schema_option
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a self-contained HTML page with bar charts to this file instead.")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table",
              show_default=True,
              help="A readable report (Markdown), or JSON for machines: a document, not rows.")
@click.option("--no-queries", is_flag=True,
              help="Sizes only: do not time the example queries.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="How often each example query runs per side; the report gives the median.")
@click.option("--query-timeout", type=A_TIMEOUT, default="30s", show_default=True,
              help="statement_timeout of each example query.")
@_fails_cleanly
@_reports
def report_command(project_dir: Path, select: tuple[str, ...], archive_schema: str,
                   html_file: Path | None, output_format: str, no_queries: bool, runs: int,
                   query_timeout: timedelta) -> None:
    """What the swaps did: rows and size before and after per table, the space runner
    cleanup frees (or freed), and example queries timed with EXPLAIN (ANALYZE, BUFFERS) on
    the original and the deduplicated table, read-only. Markdown on stdout, or --html FILE,
    or --format json."""
    options = report.ReportOptions(
        archive_schema=archive_schema, select=list(select) or None, queries=not no_queries,
        runs=runs, timeout_ms=_ms(query_timeout))
    with database(project_dir), connect() as conn:
        facts = report.gather(conn, options)
    if html_file:
        html_file.write_text(report_view.to_html(facts), encoding="utf-8")
        click.echo(f"Wrote the report to {html_file}.")
    else:
        shown = (report_view.to_json(facts) if output_format == "json"
                 else report_view.to_markdown(facts))
        click.echo(shown, nl=False)


@cli.command(name="audit")
@project_dir_option
@connection_options
@target_path_option
@dbt_flags_options
@select_option
@exclude_option
@output_format_option
@_fails_cleanly
@_reports
def audit_command(project_dir: Path, target_path: Path | None, dbt_flags: DbtFlags,
                  select: tuple[str, ...], exclude: tuple[str, ...], output_format: str) -> None:
    """How duplicated each live table is, read straight from it with one scan: rows, unique
    natural keys (under the table's NULL policy), duplicates, NULL keys, size now and after,
    and the unique indexes that ON CONFLICT could have used. Reads only; needs no dbt build,
    only the YAML (without a manifest this runs `dbt parse`). A table of a GB or more gets an
    estimate of its duration and a progress bar on stderr."""
    with database(project_dir):
        targets = _configured_targets(project_dir, _target_dir(project_dir, target_path), select,
                                      dbt_flags, exclude)
        with connect() as conn:
            watch = (None if not progress.shown()
                     else audit_view.progress_as_events(size_text) if progress.as_json()
                     else audit_view.progress_on(Console(stderr=True), size_text))
            audits = audit.audit(conn, targets, watch)
    _emit(audit_view.title(audits), audit_view.rows(audits, output_format, size_text),
          output_format)
    if output_format == "table":
        click.echo(audit_view.index_lines(audits))
        referenced = audit_view.reference_lines(audits)
        if referenced:
            click.echo(referenced)


def _relation(name: str) -> artifacts.Relation:
    schema, dot, table = name.partition(".")
    if not dot or not schema or not table:
        raise click.BadParameter(f"{name!r}: name the table as schema.table")
    return artifacts.Relation(schema, table)


@cli.command(name="suggest-keys")
@project_dir_option
@connection_options
@click.argument("table")
@click.option("--sample-rows", type=click.IntRange(min=100), default=suggest.SAMPLE_ROWS,
              show_default=True, help="About how many rows to look at first.")
@click.option("--max-columns", type=click.IntRange(1, 5), default=suggest.MAX_COLUMNS,
              show_default=True, help="The most columns a candidate key may have.")
@click.option("--show", type=click.IntRange(min=1), default=suggest.SHOWN, show_default=True,
              help="How many candidates to count on the whole table and show.")
@output_format_option
@_fails_cleanly
@_reports
def suggest_keys_command(project_dir: Path, table: str, sample_rows: int, max_columns: int,
                         show: int, output_format: str) -> None:
    """Candidate natural keys of TABLE (schema.table), found in its data: column sets under
    which its other columns are the same in every row, surrogate ids and load times set
    aside. Tried on a sample, then each shown candidate is counted on the whole table as
    `runner audit` counts it, with the groups whose rows still differ (none for a true key).
    Prints the best as the source's meta.dedup. Reads only."""
    relation = _relation(table)
    with database(project_dir), connect() as conn:
        found = suggest.suggest(conn, relation, sample_rows, max_columns, show)
    if output_format == "json":
        click.echo(json.dumps({"table": str(relation), "surrogates": list(found.surrogates),
                               "load_times": list(found.load_times),
                               "sampled_rows": found.sampled_rows,
                               "tiebreaker": found.tiebreaker,
                               "candidates": suggest_view.rows(found)}, indent=2))
        return
    if output_format == "csv":
        _emit("", suggest_view.as_text_rows(found), "csv")
        return
    for line in suggest_view.summary(found):
        click.echo(line)
    if not found.checked:
        click.echo(f"No candidate of up to {max_columns} columns: in the sample, every column "
                   "set either has no two rows alike or leaves rows that differ in another "
                   "column; raise --max-columns or --sample-rows (a table with few duplicates "
                   "holds few of them in a sample)")
        return
    _emit(f"runner suggest-keys: {relation}", suggest_view.as_text_rows(found), "table")
    click.echo("The first, as its source's meta.dedup:")
    for line in suggest_view.meta_dedup(found.checked[0], found.tiebreaker):
        click.echo(f"  {line}")
    add = suggest_view.add_line(found, found.checked[0])
    if add:
        click.echo(f"or declared in a project of yours (runner init): {add}")


def _columns(text: str) -> list[str]:
    return [column.strip() for column in text.split(",") if column.strip()]


def _keep_rule(text: str) -> list[dict[str, str]] | str:
    """`updated_at:desc,uid:desc` as meta.dedup's keep; a column alone is descending; `any`
    as it is."""
    if text.strip() == artifacts.ANY_COPY:
        return artifacts.ANY_COPY
    rule = []
    for part in _columns(text):
        column, _, order = part.rpartition(":") if ":" in part else (part, "", "desc")
        rule.append({"column": column.strip(), "order": order.strip()})
    return rule


@cli.command(name="init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="The dbt project's name [default: the directory's].")
@_fails_cleanly
@_reports
def init_command(directory: Path, name: str | None) -> None:
    """A dbt project of your own in DIRECTORY that deduplicates your tables with this runner's
    dbt package: dbt_project.yml with the folders the runner reads, packages.yml, a profile
    from libpq's variables, a .gitignore; then `dbt deps`. Add tables with `runner add`."""
    written = scaffolding.init(directory, name)
    click.echo(f"Wrote {', '.join(written)} in {directory}, and installed the dedup package.")
    click.echo(f"Next: runner add SCHEMA.TABLE --key COLUMNS --keep COLUMN --project-dir "
               f"{directory}  (runner suggest-keys SCHEMA.TABLE finds candidate keys)")


@cli.command(name="add")
@click.argument("table")
@click.option("--key", "key", required=True, help="The natural key's columns, comma-separated.")
@click.option("--keep", "keep", required=True,
              help="The keep rule, comma-separated COLUMN[:asc|desc] (desc if left out), its "
                   "last column a unique NOT NULL tie-breaker: id, or updated_at:desc,uid:desc; "
                   "or any, where a key's copies are equal in every column.")
@click.option("--nulls", type=click.Choice(artifacts.NULL_POLICIES),
              help="What a NULL in the key means [default: not_distinct].")
@click.option("--alternative-key", help="Where the key has a NULL, the rows' key instead: the "
                                        "natural key's columns and more, comma-separated.")
@click.option("--references", type=click.Choice(artifacts.REFERENCE_POLICIES),
              help="What the swap does with rows of other tables that point at a removed "
                   "duplicate [default: repoint].")
@click.option("--strategy", type=click.Choice(artifacts.STRATEGIES),
              help="swap in a new table of the kept rows, remove the duplicates in place, or "
                   "let runner swap decide from their share [default: auto].")
@click.option("--source", help="The dbt source to declare it under [default: its schema].")
@click.option("--name", help="Its dbt name, which its models are named after [default: its "
                             "own, lowercase].")
@project_dir_option
@_fails_cleanly
@_reports
def add_command(table: str, key: str, keep: str, nulls: str | None,
                alternative_key: str | None, references: str | None, strategy: str | None,
                source: str | None, name: str | None, project_dir: Path) -> None:
    """Declare TABLE (schema.table) under its source with its meta.dedup, in the project's
    models/staging/<source>/_<source>__sources.yml, then write the models and tests it needs
    (`runner models`). Reads no database: `runner build` then captures and builds it."""
    spec: dict = {"natural_key": _columns(key), "keep": _keep_rule(keep)}
    if nulls:
        spec["nulls"] = nulls
    if alternative_key:
        spec["alternative_key"] = _columns(alternative_key)
    if references:
        spec["references"] = references
    if strategy:
        spec["strategy"] = strategy
    result = scaffolding.add(project_dir, _relation(table), spec, source, name)
    click.echo(f"Declared {table} in {result.declared_in}; wrote "
               f"{', '.join(result.written) or 'nothing else'}.")


@cli.command(name="models")
@project_dir_option
@click.option("--check", is_flag=True,
              help="Write nothing: exit 1 if a generated file differs from what the "
                   "declarations make, is missing, or is left from a table no longer declared.")
@_fails_cleanly
@_reports
def models_command(project_dir: Path, check: bool) -> None:
    """Write the models and tests every table declared with meta.dedup needs (staging, key
    groups, kept rows, removed rows, their tests, the audit), from that declaration alone."""
    if check:
        drifted = scaffolding.check_models(project_dir)
        for line in drifted:
            click.echo(line)
        if drifted:
            raise click.exceptions.Exit(CHECKS_FAILED)
        click.echo("Every generated file is what the declarations make.")
        return
    written = scaffolding.write_models(project_dir)
    click.echo(f"Wrote {', '.join(written)}." if written else "Nothing to write: every "
               "generated file is what the declarations make.")


@cli.command(name="package-path")
@_fails_cleanly
@_reports
def package_path_command() -> None:
    """The dbt project this runner ships, for a project of yours that installs it as a dbt
    package (packages.yml: `- local: <this path>`), at the runner's own version."""
    click.echo(bundled_project())


@cli.group()
def db() -> None:
    """The embedded PostgreSQL server (data under .runner/ in the project)."""


@db.command()
@project_dir_option
@_fails_cleanly
@_reports
def start(project_dir: Path) -> None:
    """Start it and leave it running; `eval "$(runner db env)"` then points dbt at it."""
    server = EmbeddedPostgres(default_data_dir(project_dir))
    server.start()
    click.echo(f"Embedded PostgreSQL running on {server.conninfo['host']}:{server.port}.")


@db.command()
@project_dir_option
@_fails_cleanly
@_reports
def stop(project_dir: Path) -> None:
    """Stop it."""
    server = EmbeddedPostgres(default_data_dir(project_dir))
    if server.is_running():
        server.stop(force=True)
        click.echo("Embedded PostgreSQL stopped.")
    else:
        click.echo("Embedded PostgreSQL is not running.")


@db.command()
@project_dir_option
@_fails_cleanly
@_reports
def env(project_dir: Path) -> None:
    """Print `export` lines for the running server, for dbt and psql."""
    server = EmbeddedPostgres(default_data_dir(project_dir))
    if not server.is_running():
        raise RunnerError("the embedded server is not running: `runner db start` first")
    server.start()
    for name, value in server.environ().items():
        click.echo(f"export {name}={value}")


def main() -> None:
    cli()
