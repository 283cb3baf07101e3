"""Batch manifests: read CSV, JSON Lines or a directory of .txt scripts into rows, and
check every row before anything is submitted.

Pure functions over files: no database, no broker. What needs the database (is the
avatar known, is the webhook allowed) comes in as callables, so the whole validation
table is testable without services.

A row names a script by a path relative to the manifest's directory, or carries it
inline in a `text` column. Paths are resolved (symlinks included) and must stay
inside that directory: a manifest cannot make farm read /etc/passwd or ../secrets.

A row may instead name a template (farm/templates.py), by a `template` column resolved
the same way or by the caller's default; then every column that is not one of COLUMNS
is a variable, and the row's script is the template with its values filled in.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from farm import output as output_spec
from farm import templates
from farm.errors import FarmError, InvalidInput
from farm.script import decode_script, read_limit

COLUMNS: tuple[str, ...] = (
    "script",
    "text",
    "template",  # a script with {variables}; the row's other columns are their values
    "avatar",
    "voice",
    "webhook",
    "output",
    # the row's OutputSpec (farm/output.py)
    "format",
    "aspect",
    "fit",
    "background",
    "captions",
    "poster_at",
    "draft",
)
ALIASES: dict[str, str] = {"output_key": "output"}
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".ndjson")
MAX_OUTPUT_KEY = 200
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RawRow:
    """A row as read: `where` is how a person finds it ("line 3", "intro.txt")."""

    where: str
    values: dict[str, Any]
    line: int = 0  # 1-based line in the manifest; 0 for a file of a directory


@dataclass(frozen=True)
class Row:
    """A checked row, ready to become a job."""

    where: str
    line: int
    script: str  # cleaned text
    source: str  # the script's path relative to the manifest directory; "" when inline
    avatar: str
    voice: str
    webhook: str | None
    output: str
    # what the row delivers (farm/output.py): its columns over the batch's defaults
    spec: output_spec.OutputSpec = output_spec.OutputSpec()


@dataclass(frozen=True)
class Problem:
    where: str
    reason: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class Defaults:
    """What a row that does not say gets: the command line's --avatar, --voice, --webhook."""

    avatar: str = "demo"
    voice: str = "joe"
    webhook: str | None = None
    # --template: for rows that name no script, text or template
    template: templates.Template | None = None
    # --format, --aspect, --fit, --background, --captions, --draft over FARM_* defaults
    spec: output_spec.OutputSpec = output_spec.OutputSpec()
    # the batch's --size, which each row's aspect and draft flag must fit (None: unchecked)
    size: tuple[int, int] | None = None


# (avatar, voice, webhook or None) -> the job's webhook URL; InvalidInput when refused
CheckJob = Callable[[str, str, str | None], str | None]
# a row's cleaned script -> None; InvalidInput when it asks too much (FARM_MAX_JOB_FRAMES)
CheckScript = Callable[[str], None]


def _any_script(_text: str) -> None:
    return None


@dataclass
class Checked:
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# --- reading ----------------------------------------------------------------


def read(path: Path, templated: bool = False) -> tuple[Path, list[RawRow]]:
    """The manifest's base directory and its rows. A manifest that cannot be read at
    all (missing, not UTF-8, no script column) is InvalidInput; bad rows are not.
    `templated`: the caller has a default template, so columns that are not farm's
    own are variables, and a manifest may have no script column at all."""
    if path.is_dir():
        return path, read_directory(path)
    if not path.is_file():
        raise InvalidInput(f"no such manifest: {path}")
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InvalidInput(
            f"manifest {path.name}: use a .csv or .jsonl file, or a directory of .txt scripts"
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"manifest {path.name} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    text = _decode(path.read_bytes(), path.name)
    rows = read_csv(text, templated) if suffix == ".csv" else read_jsonl(text, templated)
    return path.parent, rows


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"manifest {name} is not valid UTF-8 (byte {exc.start})") from exc


def _column(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


def read_csv(text: str, templated: bool = False) -> list[RawRow]:
    """A header line names the columns; rows are numbered by the line they start on.
    With a 'template' column (or `templated`), other columns are variables."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInput("the manifest is empty: it has no header line") from None
    except csv.Error as exc:
        raise InvalidInput(f"line 1: {exc}") from exc
    names = [_column(h) for h in header]
    templated = templated or "template" in names
    unknown = [
        h
        for h, n in zip(header, names, strict=True)
        if n not in COLUMNS and not (templated and templates.NAME.fullmatch(n))
    ]
    if unknown:
        raise InvalidInput(f"line 1: {_unknown('column', unknown[0], templated)}")
    if "script" not in names and "text" not in names and not templated:
        raise InvalidInput(
            "line 1: the manifest needs a 'script' or a 'text' column (or a 'template' column)"
        )
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InvalidInput(f"line 1: column {duplicated[0]!r} appears twice")
    rows: list[RawRow] = []
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append(RawRow(f"line {start}", {"_error": f"unreadable CSV: {exc}"}, start))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue  # blank lines are not rows
        if len(record) != len(names):
            reason = f"has {len(record)} fields; the header has {len(names)}"
            rows.append(RawRow(f"line {line}", {"_error": reason}, line))
            continue
        values = {n: (v if v.strip() else None) for n, v in zip(names, record, strict=True)}
        rows.append(RawRow(f"line {line}", values, line))
    return rows


def read_jsonl(text: str, templated: bool = False) -> list[RawRow]:
    """One JSON object per line; blank lines are skipped. In a row with a 'template'
    field (or with `templated`), other fields are variables."""
    rows: list[RawRow] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            obj = json.loads(raw, object_pairs_hook=_no_repeats)
        except _Repeated as exc:
            rows.append(RawRow(where, {"_error": f"field {exc.args[0]!r} appears twice"}, number))
            continue
        except json.JSONDecodeError as exc:
            rows.append(RawRow(where, {"_error": f"not valid JSON ({exc.msg})"}, number))
            continue
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, [[[[...
            reason = f"not valid JSON ({type(exc).__name__}: {str(exc)[:100]})"
            rows.append(RawRow(where, {"_error": reason}, number))
            continue
        if not isinstance(obj, dict):
            reason = f"must be a JSON object, got {type(obj).__name__}"
            rows.append(RawRow(where, {"_error": reason}, number))
            continue
        values = {_column(str(k)): v for k, v in obj.items()}
        templated_row = templated or "template" in values
        extra = set(values) - set(COLUMNS)
        unknown = sorted(k for k in extra if not (templated_row and templates.NAME.fullmatch(k)))
        if unknown:
            reason = _unknown("field", unknown[0], templated_row)
            rows.append(RawRow(where, {"_error": reason}, number))
            continue
        rows.append(RawRow(where, values, number))
    return rows


def _unknown(what: str, name: str, templated: bool) -> str:
    known = ", ".join(COLUMNS)
    if templated:
        return (
            f"{what} {name!r} is neither one of farm's ({known}) nor a variable name "
            "(letters, digits and _, starting with a letter)"
        )
    return f"unknown {what} {name!r}; {what}s are {known}"


def variables(values: dict[str, Any]) -> dict[str, Any]:
    """A row's template variables: its columns that are not farm's own."""
    return {k: v for k, v in values.items() if k not in COLUMNS and not k.startswith("_")}


class _Repeated(ValueError):
    """A JSON object names a field twice (json.loads would keep only the last)."""


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        name = _column(str(key))  # an alias and its column are the same field
        if name in seen:
            raise _Repeated(name)
        seen.add(name)
    return dict(pairs)


def read_directory(base: Path) -> list[RawRow]:
    """Each .txt file is a row named by its file name; the output is its stem + .mp4."""
    return [
        RawRow(p.name, {"script": p.name})
        for p in sorted(base.iterdir(), key=lambda p: p.name)
        if p.suffix.lower() == ".txt" and not p.name.startswith(".")
    ]


# --- checking ---------------------------------------------------------------


def check_output_key(key: str) -> str | None:
    """Why `key` cannot name an output in the store, or None when it can."""
    if not key:
        return "the output key is empty"
    if len(key) > MAX_OUTPUT_KEY:
        return f"the output key has {len(key)} characters; the limit is {MAX_OUTPUT_KEY}"
    if any(not ch.isprintable() for ch in key):  # NUL, newline, bidi overrides
        return "the output key contains a control character or a formatting mark"
    if key.startswith("/"):
        return f"output key {key!r} must be relative (no leading /)"
    if "\\" in key:
        return f"output key {key!r} contains a backslash"
    parts = key.split("/")
    if ".." in parts:
        return f"output key {key!r} must not contain '..'"
    if any(p in ("", ".") for p in parts):
        return f"output key {key!r} has an empty or '.' path segment"
    return None


def script_path(base: Path, relative: str, what: str = "script") -> Path:
    """The file `relative` names inside `base`, symlinks resolved; InvalidInput when it
    is absolute, escapes `base`, or is not a regular file."""
    if "\0" in relative:
        raise InvalidInput(f"the {what} path contains a NUL byte")
    if PurePosixPath(relative).is_absolute() or Path(relative).is_absolute():
        raise InvalidInput(f"{what} path {relative!r} must be relative to the manifest")
    root = base.resolve()
    outside = f"{what} path {relative!r} leads outside the manifest's directory"
    if not Path(posixpath.normpath(root / relative)).is_relative_to(root):
        raise InvalidInput(outside)  # before looking: no probing for files outside
    try:
        target = (root / relative).resolve(strict=True)
    except FileNotFoundError:
        raise InvalidInput(f"no such {what} file: {relative}") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise InvalidInput(f"{what} path {relative!r} cannot be read: {exc}") from exc
    if not target.is_relative_to(root):  # through a symlink
        raise InvalidInput(outside)
    if not target.is_file():
        raise InvalidInput(f"{what} path {relative!r} is not a regular file")
    return target


def read_script(path: Path, max_chars: int) -> str:
    with path.open("rb") as fh:
        return decode_script(fh.read(read_limit(max_chars)), max_chars)


def default_output(source: str, text: str, suffix: str = ".mp4") -> str:
    """A script file's output is its path with the format's suffix (.mp4, .webm, .mov);
    inline text gets a name from its content, so reordering a manifest does not rename
    anything."""
    if source:
        return str(PurePosixPath(source).with_suffix(suffix))
    return f"text-{hashlib.sha256(text.encode()).hexdigest()[:12]}{suffix}"


def _string(values: dict[str, Any], name: str) -> str | None:
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
    return value.strip() or None


def check_row(
    raw: RawRow,
    base: Path,
    defaults: Defaults,
    max_chars: int,
    check_job: CheckJob,
    check_script: CheckScript = _any_script,
    seen: dict[str, Any] | None = None,
) -> Row:
    """One row to a Row, or InvalidInput with the first thing wrong with it. `seen`:
    template and background files read so far (or why they could not be), shared by a
    manifest's rows."""
    if "_error" in raw.values:
        raise InvalidInput(raw.values["_error"])
    body, source = _script_of(raw, base, defaults, max_chars, {} if seen is None else seen)
    check_script(body)
    avatar = _string(raw.values, "avatar") or defaults.avatar
    voice = _string(raw.values, "voice") or defaults.voice
    webhook = check_job(avatar, voice, _string(raw.values, "webhook") or defaults.webhook)
    spec = row_spec(raw.values, base, defaults, seen)
    output = _string(raw.values, "output") or default_output(source, body, spec.suffix)
    reason = check_output_key(output)
    if reason:
        raise InvalidInput(reason)
    output_spec.check_output_name(output, spec)
    return Row(raw.where, raw.line, body, source, avatar, voice, webhook, output, spec)


def row_spec(
    values: dict[str, Any], base: Path, defaults: Defaults, seen: dict[str, Any] | None = None
) -> output_spec.OutputSpec:
    """The row's OutputSpec: its format, aspect, fit, background, captions, poster_at and
    draft columns over the defaults. A background is a colour or a file inside the
    manifest's directory (resolved like a script)."""
    given = {c: values.get(c) for c in ("format", "aspect", "fit", "captions", "poster_at")}
    given = {c: (v.strip() or None) if isinstance(v, str) else v for c, v in given.items()}
    background: Any = _string(values, "background")
    if background is not None and output_spec.parse_color(background) is None:
        if output_spec.looks_like_color(background):
            output_spec.parse_background(background)  # an unknown colour: its own error
        path = background
        background = _once(
            {} if seen is None else seen,
            "background:" + posixpath.normpath(path),
            lambda: output_spec.background_file(script_path(base, path, "background")),
        )
    draft = values.get("draft")
    if isinstance(draft, str) and not draft.strip():
        draft = None
    spec = output_spec.build(defaults=defaults.spec, background=background, draft=draft, **given)
    if defaults.size is not None:
        output_spec.frame_size(defaults.size, spec)
    return spec


def _script_of(
    raw: RawRow,
    base: Path,
    defaults: Defaults,
    max_chars: int,
    seen: dict[str, Any],
) -> tuple[str, str]:
    """The row's cleaned script, and its path when it is a script file ("" otherwise:
    inline text and a filled-in template are named by their content)."""
    script, text = _string(raw.values, "script"), _string(raw.values, "text")
    template = _string(raw.values, "template")
    given = [f"'{c}'" for c, v in (("script", script), ("text", text), ("template", template)) if v]
    if len(given) > 1:
        several = "both" if len(given) == 2 else "all three"
        raise InvalidInput(f"give one of 'script' (a path), 'text' or 'template', not {several}")
    values = variables(raw.values)
    chosen = _template(base, template, max_chars, seen) if template else None
    if chosen is None and not given:
        chosen = defaults.template
    if chosen is not None:
        filled = templates.render(chosen, values)
        return decode_script(filled.encode(), max_chars), ""
    if not given:
        raise InvalidInput("no script: the row needs a 'script' path, 'text' or a 'template'")
    unused = sorted(k for k, v in values.items() if templates.value_text(k, v))
    if unused:
        raise InvalidInput(templates.describe(None, [], unused))
    if script:
        return read_script(script_path(base, script), max_chars), posixpath.normpath(script)
    return decode_script(str(text).encode(), max_chars), ""


def _template(
    base: Path, relative: str, max_chars: int, seen: dict[str, Any]
) -> templates.Template:
    """The template file a row names, read and parsed once per manifest."""
    return _once(
        seen,
        "template:" + posixpath.normpath(relative),
        lambda: templates.read(script_path(base, relative, "template"), relative, max_chars),
    )


def _once(seen: dict[str, Any], key: str, read: Callable[[], Any]) -> Any:
    """`read()` once per manifest for `key`: its result, or its InvalidInput again."""
    if key not in seen:
        try:
            seen[key] = read()
        except InvalidInput as exc:
            seen[key] = exc
    found = seen[key]
    if isinstance(found, InvalidInput):
        raise InvalidInput(str(found))
    return found


def check_rows(
    rows: Iterable[RawRow],
    base: Path,
    defaults: Defaults,
    max_chars: int,
    check_job: CheckJob,
    taken: Callable[[Row], str | None] = lambda _row: None,
    check_script: CheckScript = _any_script,
) -> Checked:
    """Every row checked; problems keep the manifest's order. A later row whose output
    key repeats an earlier one is a problem that names the earlier row; `taken` says
    why a row's output is already someone else's (an earlier submission's)."""
    result = Checked()
    outputs = OutputKeys()
    seen: dict[str, Any] = {}
    for raw in rows:
        try:
            row = check_row(raw, base, defaults, max_chars, check_job, check_script, seen)
        except FarmError as exc:
            result.problems.append(Problem(raw.where, str(exc), raw.line))
            continue
        reason = outputs.clash(row.output) or taken(row)
        if reason:
            result.problems.append(Problem(raw.where, reason, raw.line))
            continue
        outputs.add(row.output, row.where)
        result.rows.append(row)
    return result


def folders_of(key: str) -> list[str]:
    """'a/b/c.mp4' -> ['a', 'a/b']: the folders a key needs in a file store."""
    parts = key.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


class OutputKeys:
    """Output keys taken so far, and by whom. A key clashes with an equal key, and also
    with a key that needs it as a folder ('x' and 'x/y.mp4'): a file store cannot hold
    both, and S3 could, so both stores refuse the pair alike."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.folders: dict[str, str] = {}

    def add(self, key: str, owner: str) -> None:
        self.files[key] = owner
        for folder in folders_of(key):
            self.folders.setdefault(folder, owner)

    def clash(self, key: str) -> str | None:
        """Why `key` cannot be added, or None."""
        if key in self.files:
            return f"output key {key!r} is already used by {self.files[key]}"
        if key in self.folders:
            return (
                f"output key {key!r} is a folder of the output of {self.folders[key]}; "
                "a file and a folder cannot share a name"
            )
        for folder in folders_of(key):
            if folder in self.files:
                return (
                    f"output key {key!r} needs {folder!r} as a folder, but that is the "
                    f"output of {self.files[folder]}"
                )
        return None


# --- idempotency ------------------------------------------------------------


def row_key(scope: str, row: Row, options: Iterable[Any] = ()) -> str:
    """The job's idempotency key: a hash of the scope (the batch name) and everything
    that decides what the row renders, so the same row submitted again is the same
    job, and an edited row is a new one. Where the row sits in the manifest is not
    part of it."""
    content = [scope, row.script, row.avatar, row.voice, row.webhook, row.output, *options]
    if row.spec != output_spec.OutputSpec():  # the whole spec, draft flag included; a
        content.append(row.spec.key_json())  # default spec keeps earlier batches' keys
    blob = json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str)
    return "b1:" + hashlib.sha256(blob.encode()).hexdigest()
