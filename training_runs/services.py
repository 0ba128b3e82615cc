"""Writes for training runs. API, admin, pages, commands and tasks all call these."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count
from django.utils import timezone
from django.utils.timesince import timesince

from jobsite import failpoints
from jobsite.errors import JobInputError, check_file_name, check_text, counted, not_kept
from jobsite.events import publish
from jobsite.lifecycle import TransitionError
from jobsite.paths import RANDOM_WEIGHTS_MARKER, resolve_under
from jobsite.permissions import check
from jobsite.services import job_enqueue, job_request_cancel, job_requeue
from training_runs.models import Chunk, Corpus, TrainingPair, TrainingRun

Status = TrainingRun.Status
CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")
MAX_UPLOAD_BYTES = 20 * 2**20
NEXT_STEP = {
    Status.GENERATING: "wait for it to finish generating",
    Status.GENERATED: "review its pairs and train it (or delete it)",
    Status.TRAINING: "wait for its training to finish",
    Status.GENERATING_FAILED: "proceed with it or delete it",
    Status.TRAINING_FAILED: "proceed with it or delete it",
}


class TrainingRunBlocked(TransitionError):
    """Another run is not completed yet; the message names it and what to do."""


# --- corpus ------------------------------------------------------------------------------


def _documents(root: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    files = [p for p in files if p.suffix.lower() in CORPUS_SUFFIXES]
    if not files:
        raise JobInputError(f"No .txt, .md or .jsonl documents in {root.name}; add some.")
    documents = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise JobInputError(f"{path.name} is not valid UTF-8 text; convert it first.") from None
        except OSError as exc:
            raise JobInputError(f"{path.name} cannot be read: {exc.strerror}.") from None
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    documents.append((f"{path.name}:{number}", str(record["text"])))
                except (ValueError, KeyError, TypeError):
                    raise JobInputError(f"Line {number} of {path.name} must be a JSON object with a \"text\".") from None
                _refuse_nul(documents[-1][1], f"Line {number} of {path.name}")
        else:
            _refuse_nul(text, path.name)
            documents.append((str(path.relative_to(root) if root.is_dir() else path.name), text))
    return documents


def _refuse_nul(text: str, where: str) -> None:
    # PostgreSQL text cannot hold NUL; a file with one is binary or damaged, not a document.
    if "\x00" in text:
        raise JobInputError(
            f"{where} contains a NUL character (at character {text.index(chr(0)):,}); "
            "remove it or convert the file to plain text first."
        )


def _checked_uploads(uploads) -> list[tuple[str, bytes]]:
    """(name, content) of uploaded files (each with .name, .size and .read(), as Django's are).
    Every file is checked, from its size, before any is read into memory or written, so a
    refused upload leaves nothing behind."""
    names: list[str] = []
    for upload in uploads:
        safe = Path(upload.name).name
        if Path(safe).suffix.lower() not in CORPUS_SUFFIXES or "\x00" in safe:
            raise JobInputError(f"{safe}: upload .txt, .md or .jsonl files only.", field="files")
        if upload.size > MAX_UPLOAD_BYTES:
            raise JobInputError(f"{safe} is larger than {MAX_UPLOAD_BYTES // 2**20} MB; split it.", field="files")
        if safe in names:
            raise JobInputError(f"{safe} is uploaded twice; upload each file once.", field="files")
        names.append(safe)
    return [(safe, upload.read()) for safe, upload in zip(names, uploads)]


def _corpus_folder(name: str) -> Path:
    corpora = settings.JOBSITE_DATA_DIR / "corpora"
    folder = corpora / name
    if folder.resolve().parent != corpora.resolve():
        raise JobInputError(f"The corpus name {name!r} does not name a folder inside the corpora folder; "
                            "choose another.", field="name")
    # A folder of that name that is there already (a deleted corpus's, or documents put there for
    # a corpus made from a path) is never written into: the upload takes the next free name, and
    # the corpus's source says which.
    number = 1
    while folder.exists():
        number += 1
        folder = corpora / f"{name}-{number}"
    return folder


def _existing(name: str) -> Corpus | None:
    """The corpus a new one of this name would be taken for: names are unique ignoring case."""
    return Corpus.objects.filter(name__iexact=name).first()


def _already_exists(name: str, existing: Corpus) -> JobInputError:
    same = "" if existing.name == name else f" (as {existing.name!r})"
    return JobInputError(f"A corpus named {name!r} already exists{same}; choose another name.", field="name")


def corpus_create(
    *, name: str, path: str = "", uploads: list | None = None, chunk_size: int = 500,
    chunk_overlap: int = 50,
) -> Corpus:
    """A corpus from a file or directory under JOBSITE_DATA_DIR, or from uploaded files.

    Uploads are written to a fresh hidden folder and moved to corpora/<name> only once the
    corpus row is saved, so a refused or concurrent upload never leaves files for the next
    corpus of that name to pick up. A name is never reused: a second corpus of the same name
    is refused, not merged or replaced."""
    from training_runs.generator import check_chunking, chunk_text  # noqa: PLC0415

    check_file_name(name, "The corpus name")
    check_chunking(chunk_size, chunk_overlap)
    if existing := _existing(name):
        raise _already_exists(name, existing)
    staging = None
    if uploads:
        checked = _checked_uploads(uploads)
        root = _corpus_folder(name)
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".upload", dir=root.parent))
            for filename, content in checked:
                (staging / filename).write_bytes(content)
        except OSError as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise not_kept(exc, field="files") from None
    elif path:
        root = resolve_under(path, [settings.JOBSITE_DATA_DIR], "corpus")
    else:
        raise JobInputError("Give a path under the data directory or upload files.", field="path")
    try:
        try:
            documents = _documents(staging or root)
            chunks = [
                (document, piece)
                for document, text in documents
                for piece in chunk_text(text, size=chunk_size, overlap=chunk_overlap)
            ]
            if not chunks:
                raise JobInputError("The documents contain no text.")
        except JobInputError as exc:  # about the documents given: uploaded, or under the path
            exc.field = "files" if staging else "path"
            raise
        return _corpus_save(name=name, root=root, staging=staging, chunk_size=chunk_size,
                            chunk_overlap=chunk_overlap, num_documents=len(documents), chunks=chunks)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


CORPORA_TOPIC = "training.corpora"


def _corpus_save(*, name: str, root: Path, staging: Path | None, chunks: list[tuple[str, str]], **fields) -> Corpus:
    """The unique name decides between concurrent requests: the one whose row is saved moves
    its files into place; every other one gets the same sentence as a later request."""
    moved = False
    try:
        with transaction.atomic():
            corpus = Corpus.objects.create(name=name, source=str(root), **fields)
            Chunk.objects.bulk_create(
                Chunk(corpus=corpus, index=i, document=document, text=text) for i, (document, text) in enumerate(chunks)
            )
            # Open pages list it (and offer it in the Generate form) without a reload.
            publish(CORPORA_TOPIC, "training.corpus_created", {"id": corpus.pk, "name": corpus.name})
            if staging is not None:
                # Inside the transaction: a folder that cannot be moved rolls the row back.
                try:
                    staging.rename(root)
                except OSError as exc:
                    if root.exists():
                        raise JobInputError(
                            f"The folder corpora/{root.name} already exists in the data directory; "
                            "choose another name or remove that folder.", field="name",
                        ) from None
                    raise JobInputError(f"The folder corpora/{root.name} cannot be created: {exc.strerror}.",
                                        field="files") from None
                moved = True
    except IntegrityError:
        if existing := _existing(name):
            raise _already_exists(name, existing) from None
        raise
    except BaseException:
        if moved:  # the commit failed after the move: no row points at these files
            shutil.rmtree(root, ignore_errors=True)
        raise
    return corpus


def corpus_made_from(*, path: str) -> Corpus | None:
    """The corpus already made from this file or directory under the data directory (its
    `source`, the resolved path): giving the path again means that corpus, not a second one.
    The newest, should the page have made more than one from it."""
    root = resolve_under(path, [settings.JOBSITE_DATA_DIR], "corpus")
    return Corpus.objects.filter(source=str(root)).order_by("-created_at", "-pk").first()


# --- availability --------------------------------------------------------------------------


def training_availability() -> tuple[bool, str]:
    """Whether the encoder training needs is configured and loadable, and if not, why."""
    path = settings.JOBSITE_ENCODER_PATH
    if not path:
        return False, "No encoder is configured: set JOBSITE_ENCODER_PATH to a local encoder directory."
    try:
        resolved = resolve_under(path, settings.JOBSITE_MODEL_ROOTS, "encoder", field=None)
    except JobInputError as exc:
        return False, f"{exc} Run `manage.py setup_demo` for the MiniLM encoder."
    missing = [n for n in ("config.json", "model.safetensors") if not (resolved / n).is_file()]
    if missing:
        return False, f"The encoder at {resolved} cannot be loaded: {', '.join(missing)} missing."
    try:
        json.loads((resolved / "config.json").read_text())
    except ValueError:
        return False, f"The encoder at {resolved} cannot be loaded: config.json is not JSON."
    return True, ""


def generator_availability() -> tuple[bool, str]:
    """Whether the `causal_lm` query generator has a model worth its queries, and if not, why.

    The demo's model has random weights: it writes noise ("of>ause rem lo bel or%ed"), so it
    is refused like a missing one rather than offered."""
    path = settings.JOBSITE_GENERATOR_MODEL_PATH
    if not path:
        return False, ("No generator model is configured: set JOBSITE_GENERATOR_MODEL_PATH to a local causal LM "
                       "directory.")
    try:
        resolved = resolve_under(path, settings.JOBSITE_MODEL_ROOTS, "generator model", field=None)
    except JobInputError as exc:
        return False, f"{exc} Set JOBSITE_GENERATOR_MODEL_PATH to a local causal LM directory."
    if (resolved / RANDOM_WEIGHTS_MARKER).is_file():
        return False, (f"The generator model at {resolved} is the demo's random-weight model, which writes noise; "
                       "set JOBSITE_GENERATOR_MODEL_PATH to a trained causal LM.")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not (resolved / "config.json").is_file() or not any((resolved / name).is_file() for name in weights):
        return False, f"The generator model at {resolved} cannot be loaded: its config.json or weights are missing."
    return True, ""


def _require_generator(generator: str) -> None:
    if generator != TrainingRun.Generator.CAUSAL_LM:
        return
    available, reason = generator_availability()
    if not available:
        raise JobInputError(f"The causal_lm generator is unavailable: {reason} Use the local generator meanwhile.",
                            field="generator")


def _require_available() -> None:
    available, reason = training_availability()
    if not available:
        raise JobInputError(f"Training is unavailable: {reason}")


# --- the run -------------------------------------------------------------------------------


def blocking_sentence(run: TrainingRun) -> str:
    """Whose run blocks a new one and where it stands, as an extraction's double start says
    it: a stale tab learns whose work it would cut across, not only a run number."""
    return (
        f"A new generation cannot start while training run {run.pk}, {_started(run)}, {run.state_phrase} "
        f"({_standing(run)}); {NEXT_STEP[run.status]} first."
    )


def _started(run: TrainingRun) -> str:
    age = (timezone.now() - run.created_at).total_seconds()
    when = "just now" if age < 60 else f"{timesince(run.created_at, depth=1).replace(chr(0xA0), ' ')} ago"
    who = f" by {run.created_by.get_username()}" if run.created_by_id else ""
    return f"started{who} {when}"


def _standing(run: TrainingRun) -> str:
    """What the run's phase counts so far: "120/425 chunks", "850 pairs", "embedding 480 of 1,479 texts",
    "3 of 8 epochs"."""
    if run.status in (Status.GENERATING, Status.GENERATING_FAILED):
        return f"{run.processed_chunks:,}/{run.total_chunks:,} chunks"
    if run.status == Status.GENERATED:
        return f"{run.pair_count:,} pairs"
    if run.is_embedding:
        return f"embedding {run.embedding_label}"
    return run.epochs_label


def _blocking_run() -> TrainingRun | None:
    from training_runs.selectors import training_run_open  # noqa: PLC0415

    return training_run_open()


def training_run_check_generate(*, generator: str = "local", queries_per_chunk: int = 2) -> None:
    """Every refusal of a new generation that does not depend on the corpus: a caller that
    makes the corpus for it (`training generate <path>`) asks first, so a refusal makes nothing."""
    _require_available()
    if generator not in TrainingRun.Generator.values:
        raise JobInputError(f"The generator must be one of {', '.join(TrainingRun.Generator.values)}.", field="generator")
    _require_generator(generator)
    if not 1 <= queries_per_chunk <= 20:
        raise JobInputError("Queries per chunk must be between 1 and 20.", field="queries_per_chunk")
    blocking = _blocking_run()
    if blocking:
        raise TrainingRunBlocked(blocking_sentence(blocking))


def _require_enough_pairs(corpus: Corpus, queries_per_chunk: int) -> None:
    """A generation that cannot give the pairs training needs is refused before it starts:
    it would only end waiting for review with no way to train."""
    chunks, needed = corpus.chunks.count(), settings.JOBSITE_MIN_APPROVED_PAIRS
    if chunks * queries_per_chunk >= needed:
        return
    at_most = f"at {queries_per_chunk} quer{'ies' if queries_per_chunk != 1 else 'y'} per chunk it gives at most " \
              f"{chunks * queries_per_chunk:,} pairs, and training needs {needed:,} approved"
    if chunks == 0:
        raise JobInputError(f"Corpus {corpus.name} has no chunks; give it documents with text.", field="corpus")
    per_chunk = -(-needed // chunks)
    fix = f"Ask for {per_chunk} queries per chunk or use a larger corpus." if per_chunk <= 20 else "Use a larger corpus."
    raise JobInputError(f"Corpus {corpus.name} has {chunks:,} chunk{'s' if chunks != 1 else ''}; {at_most}. {fix}",
                        field="queries_per_chunk")


def training_run_generate(
    *, corpus: Corpus, generator: str = "local", queries_per_chunk: int = 2, user=None
) -> TrainingRun:
    """Start phase 1. The database allows one non-completed run, so concurrent requests
    get one run and, for every other one, the sentence naming it."""
    check(user, "training_runs.add_trainingrun")
    training_run_check_generate(generator=generator, queries_per_chunk=queries_per_chunk)
    _require_enough_pairs(corpus, queries_per_chunk)
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                corpus=corpus, generator=generator, queries_per_chunk=queries_per_chunk, created_by=user,
                total_chunks=corpus.chunks.count(), generating_started_at=timezone.now(),
            )
            publish(run.topic, "training.generating", run.event_payload())
            job_enqueue(run)
    except IntegrityError:
        blocking = _blocking_run()
        raise TrainingRunBlocked(
            blocking_sentence(blocking) if blocking else "Another generation started at the same moment; reload."
        ) from None
    return run


def training_run_generate_from_path(
    *, path: str, name: str = "", chunk_size: int = 500, generator: str = "local", queries_per_chunk: int = 2,
    user=None,
) -> tuple[TrainingRun, Corpus, bool]:
    """Start phase 1 on the corpus made from `path`: the one made from it before, or, when
    there is none or a `name` is given, a new one (named after the file or directory unless
    `name` says otherwise). Returns (run, corpus, whether the corpus is new).

    Every refusal comes before a corpus is made, and a run refused at the last moment (a
    concurrent start) takes the new corpus back with it: a refused generation leaves nothing
    that the same request would later trip over."""
    check(user, "training_runs.add_trainingrun")
    training_run_check_generate(generator=generator, queries_per_chunk=queries_per_chunk)
    corpus = None if name else corpus_made_from(path=path)
    if corpus is not None:
        run = training_run_generate(corpus=corpus, generator=generator, queries_per_chunk=queries_per_chunk, user=user)
        return run, corpus, False
    if not name:
        name = resolve_under(path, [settings.JOBSITE_DATA_DIR], "corpus").stem or "corpus"
        taken = _existing(name)
        if taken is not None:
            raise JobInputError(f"A corpus named {name!r} already exists, made from {taken.source}; "
                                f"the corpus made from {path} needs another name.", field="name")
    check(user, "training_runs.add_corpus")
    with transaction.atomic():
        corpus = corpus_create(name=name, path=path, chunk_size=chunk_size)
        run = training_run_generate(corpus=corpus, generator=generator, queries_per_chunk=queries_per_chunk, user=user)
    return run, corpus, True


# Why a run in each status that cannot be reviewed refuses it; follows "Training run 8 is completed; ".
NOT_REVIEWABLE = {
    Status.GENERATING: "pairs are reviewed once generation is done.",
    Status.GENERATING_FAILED: "pairs are reviewed once generation is done, so proceed with it first.",
    Status.TRAINING: "its pairs cannot be reviewed while they are used for training.",
    Status.COMPLETED: "its pairs were used for training and can no longer be reviewed.",
}


def _require_reviewable(run: TrainingRun) -> None:
    _require_not_removed(run)
    if run.status not in (Status.GENERATED, Status.TRAINING_FAILED):
        raise TransitionError(f"Training run {run.pk} {run.state_phrase}; {NOT_REVIEWABLE[run.status]}")


def _reviewed(run: TrainingRun, *, changed: bool, **payload) -> None:
    """In the review's transaction: a failed training whose pairs changed has void epochs (it
    trains on other pairs now), and the pages learn the new counts."""
    if changed and run.status == Status.TRAINING_FAILED:
        _forget_training(run)
    publish(run.topic, "training.pairs_reviewed", {**run.event_payload(), **review_counts(run), **payload})


def training_run_review(*, run: TrainingRun, decision: str, pair_ids: list[int] | None = None) -> int:
    """Approve or reject pairs (all pending ones when pair_ids is None); returns how many."""
    _require_reviewable(run)
    if decision not in (TrainingPair.Review.APPROVED, TrainingPair.Review.REJECTED):
        raise JobInputError("The decision must be approved or rejected.", field="decision")
    pairs = run.pairs.all()
    if pair_ids is None:
        pairs = pairs.filter(review=TrainingPair.Review.PENDING)
    else:
        unknown = set(pair_ids) - set(pairs.filter(pk__in=pair_ids).values_list("pk", flat=True))
        if unknown:
            raise JobInputError(f"Pairs {sorted(unknown)[:5]} do not belong to training run {run.pk}.", field="pair_ids")
        pairs = pairs.filter(pk__in=pair_ids)
    with transaction.atomic():
        changed = pairs.exclude(review=decision).exists()
        count = pairs.update(review=decision)
        _reviewed(run, changed=changed)
    return count


QUERY_LIMIT = 200  # characters; what a generator writes at most


def training_run_pair_edit(*, run: TrainingRun, pair_id: int, query: str) -> TrainingPair:
    """A reviewer rewrites a pair's query (one line, as a generator writes it); the pair is
    then approved, since a person wrote it. Where a review can be made, and with what it does
    to a failed training, as a review."""
    _require_reviewable(run)
    query = check_text(" ".join(query.split()), "The query", QUERY_LIMIT, field="query")
    if not query:
        raise JobInputError("The query is empty; write the question this chunk answers.", field="query")
    pair = run.pairs.filter(pk=pair_id).first()
    if pair is None:
        raise JobInputError(f"Pair {pair_id} does not belong to training run {run.pk}.", field="pair_id")
    if pair.query == query and pair.review == TrainingPair.Review.APPROVED:
        return pair
    twin = run.pairs.filter(chunk_id=pair.chunk_id, query=query).exclude(pk=pair.pk).first()
    if twin is not None:
        raise JobInputError(f"Pair {twin.pk} of the same chunk already asks this; approve that one and reject this one.",
                            field="query")
    with transaction.atomic():
        if not run.pairs.filter(pk=pair.pk).update(query=query, review=TrainingPair.Review.APPROVED):
            raise TransitionError(f"Pair {pair_id} was removed while you were editing it; reload the page.")
        pair.query, pair.review = query, TrainingPair.Review.APPROVED
        _reviewed(run, changed=True, edited=pair.pk)
    return pair


def _forget_training(run: TrainingRun) -> None:
    """Training resumes only on the pairs it started with: once they change, its epochs are
    void and Proceed trains from the first epoch (the embeddings of the chunks, which did not
    change, are kept). The run says so at once instead of claiming a checkpoint it will not use."""
    fields = {"epochs_done": 0, "loss_curve": [], "metrics": {}, "validation_curve": [], "best_epoch": None,
              "texts_embedded": 0,
              "texts_total": run.corpus.chunks.count() + run.pairs.filter(review=TrainingPair.Review.APPROVED).count()}
    if not TrainingRun.objects.filter(pk=run.pk, status=Status.TRAINING_FAILED).update(**fields, updated_at=timezone.now()):
        raise TransitionError(f"Training run {run.pk} changed while its pairs were reviewed; reload it.")
    for name, value in fields.items():
        setattr(run, name, value)


def review_sentence(run: TrainingRun, *, updated: int, decision: str) -> str:
    """What a review did and where the run's pairs stand, in the words every caller shows."""
    counts = review_counts(run)
    return (f"{counted(updated, 'pair')} {decision}. Training run {run.pk} now has {counts['approved']:,} approved, "
            f"{counts['rejected']:,} rejected and {counts['pending']:,} pending.{run.review_note}")


def review_counts(run: TrainingRun) -> dict:
    counts = dict.fromkeys(TrainingPair.Review.values, 0)
    for row in run.pairs.values("review").annotate(n=Count("id")):
        counts[row["review"]] = row["n"]
    return counts


def training_run_train(
    *, run: TrainingRun, epochs: int | None = None, batch_size: int | None = None, learning_rate: float | None = None,
    patience: int | None = None,
) -> TrainingRun:
    """Start phase 2 on the approved pairs."""
    from jobsite.lifecycle import transition  # noqa: PLC0415

    _require_available()
    _require_not_removed(run)
    if run.status != Status.GENERATED:
        raise TransitionError(f"Training run {run.pk} {run.state_phrase}; only a generated run can start training.")
    # `is None`, not `or`: an explicit 0 is a wrong value to refuse, not a request for the default.
    params = {"epochs": run.epochs if epochs is None else epochs,
              "train_batch_size": run.train_batch_size if batch_size is None else batch_size,
              "learning_rate": run.learning_rate if learning_rate is None else learning_rate,
              "patience": run.patience if patience is None else patience}
    if not 1 <= params["epochs"] <= 1000:
        raise JobInputError(f"Epochs must be between 1 and 1,000; got {params['epochs']}.", field="epochs")
    if not 2 <= params["train_batch_size"] <= 4096:
        raise JobInputError(f"The batch size must be between 2 and 4,096; got {params['train_batch_size']}.",
                            field="batch_size")
    # Above 0.1 the adapter's steps leave the identity faster than its decay brings it back.
    if not 0 < params["learning_rate"] <= 0.1:
        raise JobInputError(f"The learning rate must be above 0 and at most 0.1, e.g. 0.001; got "
                            f"{params['learning_rate']:g}.", field="learning_rate")
    if not 1 <= params["patience"] <= 1000:
        raise JobInputError(f"The patience must be between 1 and 1,000 epochs; got {params['patience']}.",
                            field="patience")
    approved = run.pairs.filter(review=TrainingPair.Review.APPROVED).count()
    if approved < settings.JOBSITE_MIN_APPROVED_PAIRS:
        raise JobInputError(
            f"Training needs at least {settings.JOBSITE_MIN_APPROVED_PAIRS} approved pairs; "
            f"training run {run.pk} has {approved}. Approve more pairs first."
        )
    # Every chunk and approved query is embedded first: the page counts them from the start.
    texts_total = run.corpus.chunks.count() + approved
    with transaction.atomic():
        # attempt=0: the phase counts its own attempts ("attempt 1" on a first training, not 2).
        transition(run, Status.TRAINING, training_started_at=timezone.now(), worker="", epochs_done=0, attempt=0,
                   validation_curve=[], best_epoch=None, adopted=None,
                   texts_total=texts_total, texts_embedded=0, queued_at=timezone.now(), enqueued_at=None, **params)
        job_enqueue(run)
    return run


def training_run_stop(*, run: TrainingRun) -> TrainingRun:
    """Stop a generating or training run: its worker stops between chunks or batches and the
    run waits in its failed status ("stopped on request"), with what it did kept, for
    Proceed or Delete."""
    if run.status not in TrainingRun.RUNNING:
        raise TransitionError(f"Training run {run.pk} {run.state_phrase}; only a generating or training run can be stopped.")
    return job_request_cancel(run)


def training_run_proceed(*, run: TrainingRun) -> TrainingRun:
    """After a failure: generation continues with the chunks that have no pairs yet;
    training resumes from its last checkpoint with the approved pairs."""
    _require_not_removed(run)
    if run.status not in TrainingRun.RETRYABLE_FROM:
        raise TransitionError(f"Training run {run.pk} {run.state_phrase}; only a failed run can proceed.")
    _require_available()
    with transaction.atomic():
        job_requeue(run, automatic=False, reason="proceed", clear_error=True, event_type="training.proceeded")
    return run


def _require_not_removed(run: TrainingRun) -> None:
    if run.is_removed:
        raise TransitionError(f"Training run {run.pk} was {run.removed_label}; its pairs and files are gone.")


def training_run_check_removable(*, run: TrainingRun) -> None:
    """Refuses, with the sentence every caller shows, to remove a run that works.

    A failed or stopped run can be removed, and so can one waiting for review (pairs made on
    the wrong corpus, or too few to train on, must not block every new generation for ever) and
    a completed one (search stops using it)."""
    _require_not_removed(run)
    if run.status in TrainingRun.RUNNING:
        raise TransitionError(f"Training run {run.pk} {run.state_phrase}; stop it first, then it can be removed.")
    if run.status not in TrainingRun.REMOVABLE:
        raise TransitionError(f"Training run {run.pk} {run.state_phrase}; it cannot be removed.")


def training_run_remove(*, run: TrainingRun, user=None) -> TrainingRun:
    """Remove a failed, stopped, unreviewed or completed run: its pairs go now and its files once
    that commits, while its row stays in the history (who removed it, when, its pair count and
    verdict) and blocks nothing. The event `training.removed` says the same."""
    check(user, "training_runs.remove_trainingrun")
    training_run_check_removable(run=run)
    now, by = timezone.now(), user if getattr(user, "is_authenticated", False) else None
    with transaction.atomic():
        # The row lock and the status make a concurrent Proceed or second removal wait, then lose.
        if not TrainingRun.objects.select_for_update().filter(TrainingRun.live(), pk=run.pk, status=run.status).exists():
            raise TransitionError(f"Training run {run.pk} changed while you were removing it; reload it.")
        run.pairs.all().delete()
        TrainingRun.objects.filter(pk=run.pk).update(removed_at=now, removed_by=by, updated_at=now)
        run.removed_at, run.removed_by, run.updated_at = now, by, now
        publish(run.topic, "training.removed", {**run.event_payload(), "removed_by": by.get_username() if by else "",
                                                "removed_at": now.isoformat()})
        output_dir = run.output_dir
        transaction.on_commit(lambda: shutil.rmtree(output_dir, ignore_errors=True))
    return run


# --- the worker side ------------------------------------------------------------------------


def training_run_advance(run: TrainingRun, lease) -> None:
    """The one place that decides what a worker does with a run: the phase it is in."""
    if run.status == Status.GENERATING:
        _generate(run, lease)
    elif run.status == Status.TRAINING:
        _train(run, lease)


def _generator(run: TrainingRun):
    """The run's generator, knowing the queries already stored: on a resume it writes none of
    them again for another chunk."""
    from training_runs.generator import CausalLMGenerator, LocalGenerator  # noqa: PLC0415

    written = run.pairs.values_list("query", flat=True).iterator()
    if run.generator == TrainingRun.Generator.CAUSAL_LM:
        _require_generator(run.generator)  # the model may have been replaced since the run started
        path = resolve_under(settings.JOBSITE_GENERATOR_MODEL_PATH, settings.JOBSITE_MODEL_ROOTS, "generator model",
                             field=None)
        return CausalLMGenerator(model_path=str(path), queries_per_chunk=run.queries_per_chunk,
                                 device=settings.JOBSITE_DEVICE, written=written)
    return LocalGenerator(queries_per_chunk=run.queries_per_chunk, written=written)


def _generate(run: TrainingRun, lease) -> None:
    from training_runs.generator import run_generation  # noqa: PLC0415

    done = Chunk.objects.filter(corpus=run.corpus, pairs__run=run).distinct()
    pending = run.corpus.chunks.exclude(pk__in=done.values("pk")).order_by("index").values_list("pk", "text")
    counters = {"processed_chunks": done.count(), "pair_count": run.pairs.count(),
                "queries_dropped": run.queries_dropped}

    def save(chunk_id: int, queries: list[str], dropped: int) -> None:
        # One chunk's pairs and the counters commit together: a crash keeps all or none.
        with transaction.atomic():
            TrainingPair.objects.bulk_create(TrainingPair(run=run, chunk_id=chunk_id, query=q) for q in queries)
            counters["processed_chunks"] += 1
            counters["pair_count"] += len(queries)
            counters["queries_dropped"] += dropped
            lease.report(**counters, final=counters["processed_chunks"] == run.total_chunks)

    lease.report(**counters, final=True)
    run_generation(
        list(pending), _generator(run), batch_size=8, save=save, heartbeat=lease.heartbeat,
        should_cancel=lease.should_cancel,
        failpoint=failpoints.make(settings.JOBSITE_FAILPOINTS, attempt=run.attempt),
        start_index=counters["processed_chunks"],
    )
    lease.set_status(Status.GENERATED, generated_at=timezone.now(), worker="", error_type="", error_message="")


def _train(run: TrainingRun, lease) -> None:
    from training_runs.trainer import TrainSpec, run_training, split_pairs  # noqa: PLC0415

    positions = {pk: i for i, pk in enumerate(run.corpus.chunks.order_by("index").values_list("pk", flat=True))}
    chunk_texts = list(run.corpus.chunks.order_by("index").values_list("text", flat=True))
    approved = run.pairs.filter(review=TrainingPair.Review.APPROVED).order_by("pk")
    train, validation, test = split_pairs([(p.pk, p.query, positions[p.chunk_id]) for p in approved])
    spec = TrainSpec(
        encoder_path=str(resolve_under(settings.JOBSITE_ENCODER_PATH, settings.JOBSITE_MODEL_ROOTS, "encoder", field=None)),
        output_dir=str(run.output_dir), epochs=run.epochs, batch_size=run.train_batch_size,
        learning_rate=run.learning_rate, device=settings.JOBSITE_DEVICE, patience=run.patience,
        shared_dir=str(settings.JOBSITE_DATA_DIR / "embeddings"),
    )
    sizes = {"train_pairs": len(train), "validation_pairs": len(validation), "test_pairs": len(test)}

    def embedding_progress(done: int, total: int) -> None:
        lease.report(texts_embedded=done, texts_total=total, final=done == total)

    def progress(epoch: int, epochs: int, losses: list[float], partial: dict) -> None:
        validation_part = partial["validation"]
        lease.report(epochs_done=epoch, loss_curve=losses, final=epoch == epochs,
                     validation_curve=validation_part["curve"], best_epoch=partial["best_epoch"] or None,
                     metrics={"before": partial["before"], "validation_before": validation_part["before"], **sizes})

    result = run_training(
        spec, chunk_texts=chunk_texts, train_pairs=train, validation_pairs=validation, test_pairs=test,
        progress=progress, embedding_progress=embedding_progress, heartbeat=lease.heartbeat,
        should_cancel=lease.should_cancel, failpoint=failpoints.make(settings.JOBSITE_FAILPOINTS, attempt=run.attempt),
    )
    lease.set_status(
        Status.COMPLETED, worker="", loss_curve=result.loss_curve, epochs_done=result.epochs_run, error_type="",
        error_message="", validation_curve=result.validation_curve, best_epoch=result.best_epoch,
        adopted=result.adopted,
        metrics={"before": result.before, "after": result.after, "validation_before": result.validation_before,
                 "validation_after": result.validation_curve[result.best_epoch - 1], **sizes},
    )


def training_run_check_adoptable(*, run: TrainingRun) -> None:
    """Refuses, with the sentence every caller shows, to adopt what cannot be: every caller asks
    this before its confirmation, so nobody confirms what cannot happen."""
    if run.status != Status.COMPLETED or run.removed_at:
        raise TransitionError(f"Training run {run.pk} {run.state_phrase}; only a completed run's adapter can be adopted.")
    if run.adopted:
        raise TransitionError(f"Training run {run.pk}'s adapter is adopted already.")
    if not run.best_epoch:
        raise TransitionError(f"Training run {run.pk} has no trained epoch to adopt.")


def training_run_adopt(*, run: TrainingRun, user=None) -> TrainingRun:
    """A person adopts the adapter a completed run did not adopt: search then goes through it.

    The run chose it as its best epoch on validation, where it did not beat the encoder alone;
    every caller asks for a confirmation first, and the run keeps who adopted it and when."""
    check(user, "training_runs.adopt_trainingrun")
    training_run_check_adoptable(run=run)
    now = timezone.now()
    with transaction.atomic():
        if not TrainingRun.objects.filter(pk=run.pk, status=Status.COMPLETED, adopted=False, removed_at=None).update(
                adopted=True, adopted_by=user, adopted_at=now, updated_at=now):
            raise TransitionError(f"Training run {run.pk} changed meanwhile; reload it.")
        run.adopted, run.adopted_by, run.adopted_at = True, user, now
        publish(run.topic, "training.adopted", {**run.event_payload(), "adopted_by": getattr(user, "username", "") or ""})
    return run
