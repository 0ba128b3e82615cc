"""Cleanup of job outputs: what nobody needs, what a Retry could still start from, and what stays.

Every job kind says where its outputs live (`outputs_root()`: one folder per job, named by its
id) and what each of its statuses leaves there (`output_use()`); this module walks those folders
and asks, for every kind the registry knows. It never touches the folder of an active job, nor
one that a finished or waiting job still needs (a result, a review, a Proceed). Temporary files
are listed only inside folders of finished (terminal) jobs. It prints nothing: the command does.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from django.db import models

from jobsite.clusters import job_models
from jobsite.models import Job

GARBAGE, REUSABLE, NEEDED, ACTIVE = "garbage", "reusable", "needed", "active"


@dataclass(frozen=True)
class Item:
    """One file or folder cleanup found, with the job it belongs to (kind "" and id None: none)."""

    path: Path
    use: str  # GARBAGE, REUSABLE, NEEDED or ACTIVE
    size: int  # bytes, links not followed; 0 for folders left alone (not measured)
    reason: str
    kind: str = ""
    job_id: int | None = None
    # REUSABLE items: (done, total) a Retry would start from, counted in `unit`.
    reusable: tuple[int, int] | None = None
    unit: str = ""
    # A temporary file (or folder) inside a job's folder, not the job's folder itself.
    temporary: bool = False


@dataclass
class Findings:
    """Every entry found, in listing order: garbage (what a cleanup removes), reusable outputs
    (removed only when asked too), and job folders left alone (needed or active)."""

    items: list[Item] = field(default_factory=list)

    def removable(self, *, include_reusable: bool = False) -> list[Item]:
        uses = (GARBAGE, REUSABLE) if include_reusable else (GARBAGE,)
        listed = [item for item in self.items if item.use in uses]
        # A temporary file goes with its job's folder when that goes too: listed once.
        whole = {(item.kind, item.job_id) for item in listed if item.job_id is not None and not item.temporary}
        return [item for item in listed if not (item.temporary and (item.kind, item.job_id) in whole)]

    @property
    def reusable(self) -> list[Item]:
        return [item for item in self.items if item.use == REUSABLE]

    @property
    def kept(self) -> list[Item]:
        return [item for item in self.items if item.use in (NEEDED, ACTIVE)]


@dataclass
class Removal:
    removed: list[Item] = field(default_factory=list)
    # (item, why it was left): its job became active or needed since it was listed.
    skipped: list[tuple[Item, str]] = field(default_factory=list)
    # (item, the error as a sentence): the file system refused.
    failed: list[tuple[Item, str]] = field(default_factory=list)


def output_kinds() -> list[type[Job]]:
    """Job kinds that write output folders."""
    return [model for model in job_models() if model.outputs_root() is not None]


def cleanup_find() -> Findings:
    """Everything in the kinds' output folders, sorted into garbage, reusable and kept, each kind's
    folders in numeric order (job 2 before job 10), then entries that are no job's."""
    found = Findings()
    for model in output_kinds():
        root = model.outputs_root()
        if not root.is_dir():
            continue
        entries = sorted(root.iterdir(), key=lambda path: _numeric(model, path))
        ids = [pk for pk in (_job_id(model, path) for path in entries) if pk is not None]
        rows = model.objects.in_bulk(ids)
        live = set(model.objects.filter(model.live(), pk__in=ids).values_list("pk", flat=True))
        for path in entries:
            _sort(found, model, path, rows, live)
    return found


def cleanup_remove(*, items: list[Item]) -> Removal:
    """Remove what was listed, each item judged again just before it goes: a job retried,
    resumed or started since the listing keeps its folder, and says why."""
    done = Removal()
    for item in items:
        why = _still_removable(item)
        if why:
            done.skipped.append((item, why))
            continue
        try:
            if item.path.is_symlink() or not item.path.is_dir():
                item.path.unlink(missing_ok=True)
            else:
                shutil.rmtree(item.path)
        except OSError as exc:
            done.failed.append((item, f"{exc.strerror or exc}"))
            continue
        done.removed.append(item)
    return done


def _job_id(model: type[Job], path: Path) -> int | None:
    """The id a folder is named by ("12"; not "012", "١٢" or beyond what the id column holds)."""
    name = path.name
    if not (name.isascii() and name.isdigit() and name == str(int(name))):
        return None
    big = isinstance(model._meta.pk, models.BigAutoField)
    return int(name) if int(name) < 2 ** (63 if big else 31) else None


def _numeric(model: type[Job], path: Path) -> tuple:
    pk = _job_id(model, path)
    return (0, pk, "") if pk is not None else (1, 0, path.name)


def _label(model: type[Job]) -> str:
    return str(model._meta.verbose_name)


def _judge(model: type[Job], pk: int, row: Job | None, is_live: bool) -> tuple[str, str, Job | None]:
    """(use, reason, row) of the folder of job `pk` of this kind."""
    if row is None:
        return GARBAGE, f"{_label(model)} {pk} no longer exists", None
    if not is_live:
        return GARBAGE, f"{_label(model)} {pk} was removed", row
    use, reason = row.output_use()
    return use, reason, row


def _sort(found: Findings, model: type[Job], path: Path, rows: dict, live: set) -> None:
    pk = _job_id(model, path)
    if pk is None or not (path.is_dir() or path.is_symlink()):
        found.items.append(Item(path, GARBAGE, _size(path), "not a job directory"))
        return
    use, reason, row = _judge(model, pk, rows.get(pk), pk in live)
    job = {"kind": model.KIND, "job_id": pk}
    link = path.is_symlink()
    if link:
        # A folder kept elsewhere: judged as the job's, but only the link would go.
        reason += f" (a link to {os.readlink(path)}, which is left as it is)"
    if use == GARBAGE:
        found.items.append(Item(path, GARBAGE, _size(path), reason, **job))
        return
    if use == REUSABLE:
        found.items.append(Item(path, REUSABLE, _size(path), reason, reusable=row.output_reuse(),
                                unit=row.OUTPUT_UNIT, **job))
    elif use == NEEDED and row.is_terminal and not link and not any(path.iterdir()):
        found.items.append(Item(path, GARBAGE, 0, f"{reason}; its folder is empty", **job))
        return
    else:
        found.items.append(Item(path, use, 0, reason, **job))
    # Inside the folder of a finished job: its temporary files, which no worker can be writing.
    if row.is_terminal and use != ACTIVE and not link:
        found.items += [Item(tmp, GARBAGE, _size(tmp), "unfinished temporary file", temporary=True, **job)
                        for tmp in _temporary(path)]


def _temporary(folder: Path) -> list[Path]:
    """`*.tmp*` files and folders under `folder` (not inside one another), links not followed."""
    found = []
    for top, dirs, files in os.walk(folder):
        for name in sorted(dirs):
            if ".tmp" in name:
                found.append(Path(top) / name)
        dirs[:] = sorted(d for d in dirs if ".tmp" not in d)
        found += [Path(top) / name for name in sorted(files) if ".tmp" in name]
    return sorted(found)


def _size(path: Path) -> int:
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
        total = 0
        for top, _dirs, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(top, name)).st_size
                except OSError:
                    pass
        return total
    except OSError:
        return 0


def _still_removable(item: Item) -> str:
    """Why `item` must stay now ("" when it may go)."""
    if not item.path.exists() and not item.path.is_symlink():
        return "it is gone already"
    if item.job_id is None:
        return ""
    model = next((m for m in output_kinds() if m.KIND == item.kind), None)
    if model is None:
        return f"no job kind {item.kind!r} is known now"
    row = model.objects.filter(pk=item.job_id).first()
    is_live = model.objects.filter(model.live(), pk=item.job_id).exists()
    use, reason, row = _judge(model, item.job_id, row, is_live)
    if item.temporary:
        return "" if row is not None and row.is_terminal and use != ACTIVE else f"{reason} now"
    if use == GARBAGE or (use == REUSABLE and item.use == REUSABLE):
        return ""
    if use == NEEDED and item.reason.endswith("its folder is empty") and row.is_terminal:
        return "" if not any(item.path.iterdir()) else f"{reason}, and its folder is no longer empty"
    return f"{reason} now"
