"""One extraction run by several workers at once: its global order cut into shards.

A shard is a contiguous range of the global order (longest first). Its boundaries fall on
multiples of the batch size, so each shard runs exactly the batches one worker would run there,
and the files come out byte-identical to a one-worker run with the same batch size. The
boundaries balance the work (a batch's padded tokens, and the attention over them), not the
sample count: the first shards hold the long samples.

The planner (one worker) tokenizes, preallocates the files as a one-worker run does, writes one
checkpoint per shard under `shards/`, and writes `shards.json` last: a worker takes a shard
only where it finds that file, which is how it knows that it sees the job's directory. Each
shard's worker then reads the ids and offsets from the files (nothing is tokenized again) and
writes its rows, syncing them before its own checkpoint counts them. Once every shard is done,
`finish` writes metadata.json and the one checkpoint a one-worker run leaves, and removes the
shard files.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil

import numpy as np

from extraction.runner import outputs
from extraction.runner.model import inspect
from extraction.runner.outputs import CHECKPOINT, LAYOUT, METADATA, OFFSETS, SHARDS_DIR, TOKENIZER, TOKENS
from extraction.runner.plan import FORMAT_VERSION, IDS_DTYPE, PARTS_DIR, ExtractionSpec, Plan, validate
from jobsite.errors import JobInputError


def checkpoint_name(index: int) -> str:
    return os.path.join(SHARDS_DIR, f"{index}.json")


def done_name(index: int) -> str:
    """Written once a shard's last rows are synced: a stalled worker that wakes up later and
    writes its older checkpoint over the one its successor finished does not undo it."""
    return os.path.join(SHARDS_DIR, f"{index}.done.json")


def mark_done(directory: str, index: int, checkpoint: dict) -> None:
    outputs.write_json(os.path.join(directory, done_name(index)), checkpoint)


def _final_checkpoint(directory: str, index: int) -> dict | None:
    for name in (done_name(index), checkpoint_name(index)):
        try:
            with open(os.path.join(directory, name)) as f:
                checkpoint = json.load(f)
        except (OSError, ValueError):
            continue
        if name == checkpoint_name(index) or checkpoint.get("samples_done") == checkpoint.get("end_sample"):
            return checkpoint
    return None


def bounds(lengths: np.ndarray, batch_size: int, count: int, hidden: int | None = None) -> list[tuple[int, int]]:
    """[(first, end)] positions of the global order (lengths in that order) for at most `count`
    shards: each starts at a multiple of batch_size and holds at least one batch, and the work of
    their batches is as even as contiguous ranges allow.

    A batch of B samples padded to L costs B * L tokens through the model's linear layers
    (about 24 d^2 operations a token and layer, d = `hidden`) and B * L * L through attention
    (about 4 L d a token): B * L * (1 + L / 6d). Without `hidden`, its padded tokens alone. The
    attention term is what the long samples of the first shards cost beyond their tokens: at 512
    wide and 256 tokens, 8 % (a cut by tokens alone left the first of two shards 8 % slower)."""
    total = len(lengths)
    batches = max(1, -(-total // batch_size))
    count = max(1, min(count, batches))
    starts = np.arange(batches) * batch_size
    sizes = np.minimum(starts + batch_size, total) - starts
    heads = np.maximum(lengths[starts], 1) if total else np.ones(batches, dtype=np.int64)
    work = sizes * heads * (1 + heads / (6 * hidden) if hidden else 1)
    cost = np.concatenate([[0], np.cumsum(work)])
    cuts = [0]
    for k in range(1, count):
        target = cost[-1] * k / count
        j = int(np.searchsorted(cost, target))
        if j > 0 and target - cost[j - 1] < cost[min(j, batches)] - target:
            j -= 1
        # At least one batch for this shard and for each one after it.
        cuts.append(min(max(j, cuts[-1] + 1), batches - (count - k)))
    cuts.append(batches)
    return [(cuts[k] * batch_size, min(cuts[k + 1] * batch_size, total)) for k in range(count)]


def read_layout(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, LAYOUT)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_shard_checkpoint(directory: str, index: int) -> dict | None:
    try:
        with open(os.path.join(directory, checkpoint_name(index))) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def layout_for(spec: ExtractionSpec, plan: Plan, count: int, metadata: dict, *, seed_from: str | None = None) -> dict:
    """The plan's layout: cut anew, or, for a retry of the same request (seed_from, the retried
    job's directory), cut as the retried job was, whatever the batch size now, so that the
    shards it finished count."""
    lengths = np.diff(plan.offsets)
    order = np.argsort(-lengths, kind="stable")
    in_order = lengths[order]
    tokens_upto = np.concatenate([[0], np.cumsum(in_order)])
    earlier = read_layout(seed_from) if seed_from else None
    if earlier and earlier.get("fingerprint") == plan.fingerprint and earlier.get("format_version") == FORMAT_VERSION:
        cut = [(s["first_sample"], s["end_sample"]) for s in earlier["shards"]]
    else:
        cut = bounds(in_order, spec.batch_size, count, plan.info.hidden_size)
    parts = [{"index": index, "first_sample": int(first), "end_sample": int(end), "samples": int(end - first),
              "tokens": int(tokens_upto[end] - tokens_upto[first])} for index, (first, end) in enumerate(cut)]
    return {"format_version": FORMAT_VERSION, "fingerprint": plan.fingerprint, "batch_size": spec.batch_size,
            "samples": len(lengths), "tokens": int(plan.offsets[-1]), "clamped_tokens": plan.clamped_tokens,
            "truncated_samples": plan.truncated_samples, "dataset": plan.dataset, "shards": parts,
            "metadata": metadata}


def _same_cut(a: dict | None, b: dict) -> bool:
    """Two layouts of the same request cut the same way: a shard's rows in one count in the other
    (with another batch size, its pending batches are cut anew from where it stopped)."""
    return bool(a) and all(a.get(key) == b[key] for key in ("format_version", "fingerprint")) and [
        (s["first_sample"], s["end_sample"]) for s in a.get("shards", [])] == [
        (s["first_sample"], s["end_sample"]) for s in b["shards"]]


def _fresh_checkpoint(layout: dict, part: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "fingerprint": layout["fingerprint"], "batch_size": layout["batch_size"],
            "samples_done": part["first_sample"], "batches_done": part["first_sample"] // layout["batch_size"],
            "first_sample": part["first_sample"], "end_sample": part["end_sample"], "shard": part["index"],
            "requested_batch_size": layout["batch_size"]}


def valid_checkpoint(checkpoint: dict | None, layout: dict, part: dict) -> bool:
    return (isinstance(checkpoint, dict) and checkpoint.get("fingerprint") == layout["fingerprint"]
            and checkpoint.get("requested_batch_size") == layout["batch_size"]
            and checkpoint.get("first_sample") == part["first_sample"]
            and checkpoint.get("end_sample") == part["end_sample"]
            and isinstance(checkpoint.get("samples_done"), int)
            and part["first_sample"] <= checkpoint["samples_done"] <= part["end_sample"])


def seed(src: str, dst: str, layout: dict) -> bool:
    """Before dst's files are made: copy src's (a retried extraction's) when it was cut the same
    way, so the shards it finished are not run again. Its checkpoint and layout go last."""
    if not _same_cut(read_layout(src), layout) or os.path.realpath(src) == os.path.realpath(dst):
        return False
    names = [name for name in layout["metadata"]["files"] if name != METADATA]
    if not all(os.path.isfile(os.path.join(src, name)) for name in names) or not os.path.isdir(
            os.path.join(src, TOKENIZER)):
        return False
    # The checkpoints are read before the rows are copied: a worker still writing there (one
    # stopping at its next batch) may move a checkpoint on, never past the rows copied after it.
    kept = {part["index"]: read_shard_checkpoint(src, part["index"]) for part in layout["shards"]}
    os.makedirs(os.path.join(dst, SHARDS_DIR), exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    shutil.rmtree(os.path.join(dst, TOKENIZER), ignore_errors=True)
    shutil.copytree(os.path.join(src, TOKENIZER), os.path.join(dst, TOKENIZER))
    for part in layout["shards"]:
        checkpoint = kept[part["index"]]
        if checkpoint and checkpoint.get("requested_batch_size") != layout["batch_size"]:
            # The retry asks for another size (half, after out-of-memory): it starts at that size;
            # the halvings and growth budget were the retried job's.
            checkpoint = {**checkpoint, "batch_size": layout["batch_size"], "batch_fit_tokens": None,
                          "batch_size_changes": [], "requested_batch_size": layout["batch_size"]}
        if valid_checkpoint(checkpoint, layout, part):
            outputs.write_json(os.path.join(dst, checkpoint_name(part["index"])), checkpoint)
    shutil.copyfile(os.path.join(src, CHECKPOINT), os.path.join(dst, CHECKPOINT))
    return True


def write_plan(spec: ExtractionSpec, layout: dict) -> list[int]:
    """Every shard's checkpoint (kept where it counts in this layout, else a fresh one), then
    the layout; returns the samples each shard has done already."""
    out = spec.output_dir
    os.makedirs(os.path.join(out, SHARDS_DIR), exist_ok=True)
    done = []
    for part in layout["shards"]:
        # A checkpoint kept from an earlier attempt or seeded from a retried job counts when it
        # was cut the same way (outputs.remove_stale took any that came with other files).
        checkpoint = read_shard_checkpoint(out, part["index"])
        if not valid_checkpoint(checkpoint, layout, part):
            checkpoint = _fresh_checkpoint(layout, part)
            outputs.write_json(os.path.join(out, checkpoint_name(part["index"])), checkpoint)
        done.append(checkpoint["samples_done"] - part["first_sample"])
    outputs.write_json(os.path.join(out, LAYOUT), layout)
    return done


def remove(directory: str) -> None:
    """A shard checkpoint or layout left by an earlier request must not vouch for new files."""
    shutil.rmtree(os.path.join(directory, SHARDS_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(directory, LAYOUT)):
        os.remove(os.path.join(directory, LAYOUT))


def load_plan(spec: ExtractionSpec) -> tuple[Plan, dict]:
    """The plan as the planner left it in the output directory: nothing is tokenized again."""
    out = spec.output_dir
    layout = read_layout(out)
    if layout is None:
        raise JobInputError(f"{out} holds no shard plan ({LAYOUT}): the job's files are not there.")
    info, config, tokenizer = inspect(spec.model_path)
    layers, hooks = validate(spec, info, config)
    offsets = np.load(os.path.join(out, OFFSETS))
    ids_file = open(os.path.join(out, TOKENS), "rb")  # noqa: SIM115 - the plan holds it open
    try:
        major, _minor = np.lib.format.read_magic(ids_file)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(ids_file)
        at = ids_file.tell()
        if dtype != IDS_DTYPE or shape != (int(offsets[-1]),):
            raise JobInputError(f"{out}/{TOKENS} does not hold the ids its offsets count; retry the extraction.")
        ids_map = mmap.mmap(ids_file.fileno(), 0, access=mmap.ACCESS_READ)
        ids = np.frombuffer(ids_map, dtype=IDS_DTYPE, count=shape[0], offset=at)
    except BaseException:
        ids_file.close()
        raise
    plan = Plan(info, tokenizer, layers, hooks, ids, offsets, layout["clamped_tokens"], layout["truncated_samples"],
                layout["fingerprint"], layout["dataset"], ids_file, None, ids_map)
    return plan, layout


def open_files(spec: ExtractionSpec, plan: Plan) -> dict[str, int]:
    """{layer file: byte offset of its row 0}, once the files are the ones the plan made."""
    rows, dtype = int(plan.offsets[-1]), np.dtype(spec.storage_dtype)
    shapes = {name: (rows, width) for name, width in plan.widths().items()}
    starts = outputs.matching(spec.output_dir, plan, shapes, dtype)
    if starts is None:
        raise JobInputError(f"The files in {spec.output_dir} are not the ones this extraction planned; retry it.")
    return starts


def progress(directory: str) -> tuple[int, int] | None:
    """(samples done, samples) over every shard's checkpoint; None where no shard plan is."""
    layout = read_layout(directory)
    if layout is None:
        return None
    done = 0
    for part in layout["shards"]:
        checkpoint = read_shard_checkpoint(directory, part["index"])
        if valid_checkpoint(checkpoint, layout, part):
            done += checkpoint["samples_done"] - part["first_sample"]
    return done, layout["samples"]


def finish(spec: ExtractionSpec) -> dict:
    """Once every shard is done: metadata.json (written last, as a one-worker run does) and the
    checkpoint a one-worker run leaves; the shard files go. Returns the metadata. Done already:
    the metadata as written."""
    out = spec.output_dir
    layout = read_layout(out)
    if layout is None:
        with open(os.path.join(out, METADATA)) as f:
            return json.load(f)
    inf_values, last = 0, None
    for part in layout["shards"]:
        checkpoint = _final_checkpoint(out, part["index"])
        if not valid_checkpoint(checkpoint, layout, part) or checkpoint["samples_done"] != part["end_sample"]:
            raise JobInputError(f"Shard {part['index']} of {out} is not done; its worker goes on with it.")
        inf_values += int(checkpoint.get("inf_values", 0))
        last = checkpoint
    metadata = {**layout["metadata"], "inf_values": inf_values}
    outputs.write_json(os.path.join(out, CHECKPOINT), {
        "format_version": FORMAT_VERSION, "fingerprint": layout["fingerprint"], "batch_size": last["batch_size"],
        "samples_done": layout["samples"], "batches_done": last["batches_done"], "dataset": layout["dataset"],
        "inf_values": inf_values})
    outputs.write_json(os.path.join(out, METADATA), metadata)
    remove(out)
    # The parts a plan was joined from stay until here: a planner that died before its shards
    # were recorded joins them again.
    shutil.rmtree(os.path.join(out, PARTS_DIR), ignore_errors=True)
    return metadata


def sees(directory: str, fingerprint: str | None = None) -> bool:
    """Whether this host sees the planned job's files in `directory` (and may write there)."""
    layout = read_layout(directory)
    if layout is None or (fingerprint and layout.get("fingerprint") != fingerprint):
        return False
    return os.access(directory, os.W_OK) and os.access(os.path.join(directory, SHARDS_DIR), os.W_OK)


__all__ = ["LAYOUT", "TOKENIZER", "bounds", "finish", "load_plan", "open_files", "progress", "read_layout", "remove",
           "seed", "sees", "write_plan"]
