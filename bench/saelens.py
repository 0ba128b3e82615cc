"""Does SAELens read our export as its own cached activations? Checked with SAELens itself, end to end.

    .venv/bin/python bench/saelens.py                       # venv in /tmp/jobsite-saelens-venv (made once)
    .venv/bin/python bench/saelens.py --venv /tmp/saevenv2  # an existing venv with the pins below
    .venv/bin/python bench/saelens.py --storage-dtype float16 --context-size 64

A tiny GPT-2 is built from a config (random weights, nothing downloaded), the runner extracts the
residual stream, MLP output and MLP neurons of two layers from the first --samples lines of the
demo dataset, and extraction/export.py writes them as a `datasets` dataset. Then, in a venv of its
own, SAELens's `ActivationsStore` (model=None, cached_activations_path=the export) reads every
hook column batch by batch, and each raw batch of activations and token ids is compared with the
extraction's .npy files (read with numpy, not through the exporter).

SAELens lives in a venv of its own because it pulls transformer-lens, wandb and more, which the
project's venv must not carry; bench/requirements.txt (installed into the project venv by
`make bench`) therefore does not list it. SAELENS_PINS is the set checked to install together
with the project's torch, numpy and transformers (sae-lens >= 6.46.1 reads cached activations
without a model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = "/tmp/jobsite-saelens-venv"
SAELENS_PINS = [
    "torch==2.13.0", "numpy==2.4.6", "transformers==5.23.0", "tokenizers==0.23.3", "safetensors==0.8.0",
    "huggingface-hub==2.4.0", "datasets==5.2.0", "sae-lens==6.54.12",
]
LAYERS, HOOKS = (0, 2), ("residual", "mlp", "mlp_hidden")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=DEFAULT_VENV,
                        help=f"the SAELens venv, made when missing (default {DEFAULT_VENV})")
    parser.add_argument("--samples", type=int, default=300, help="lines of the demo dataset to extract (default 300)")
    parser.add_argument("--context-size", type=int, default=32, help="tokens per exported sequence (default 32)")
    parser.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--work", help="where to build (default: a new temporary directory)")
    # Inside the SAELens venv, the script runs itself with these: SAELens reads, numpy compares.
    parser.add_argument("--check", nargs=2, metavar=("EXPORT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        return check(Path(args.check[0]), Path(args.check[1]), args.context_size)
    return run(args)


def run(args) -> int:
    sys.path.insert(0, str(REPO))
    from extraction.export import export_hf_datasets
    from extraction.runner import ExtractionSpec, run_extraction
    from jobsite.demo import build_tiny_causal_lm

    work = Path(args.work or tempfile.mkdtemp(prefix="jobsite-saelens-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "extraction" / "demo_data" / "samples.txt").read_text(encoding="utf-8").splitlines()
    texts = lines[: args.samples]
    dataset = work / "samples.txt"
    dataset.write_text("\n".join(texts) + "\n", encoding="utf-8")
    model = build_tiny_causal_lm(str(work / "tiny-gpt2"), lines[:1000], arch="gpt2", n_layer=3, hidden=32,
                                 n_head=4, vocab_size=300)
    output = work / "output"
    started = time.perf_counter()
    extracted = run_extraction(
        ExtractionSpec(model, str(dataset), str(output), LAYERS, HOOKS, 16, storage_dtype=args.storage_dtype),
        progress=None, heartbeat=None, should_cancel=None,
    )
    print(f"Extracted {extracted.samples} samples ({extracted.tokens:,} tokens) of a tiny GPT-2, layers "
          f"{', '.join(map(str, LAYERS))}, hooks {', '.join(HOOKS)}, {args.storage_dtype}, in "
          f"{time.perf_counter() - started:.1f} s: {output}")
    started = time.perf_counter()
    exported = export_hf_datasets(output, work / "export", context_size=args.context_size)
    print(f"Exported {exported.sequences} sequences of {exported.context_size} tokens ({exported.rows_left_over} rows "
          f"left over), columns {', '.join(exported.columns)}, in {time.perf_counter() - started:.1f} s: "
          f"{exported.path}")

    python = ensure_venv(Path(args.venv))
    checked = subprocess.run([str(python), __file__, "--check", str(exported.path), str(output),
                              "--context-size", str(args.context_size)], cwd=REPO)
    return checked.returncode


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('sae-lens'), m.version('datasets'))"
    if python.exists():
        found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.split() == ["6.54.12", "5.2.0"]:
            return python
    else:
        print(f"Making the SAELens venv {venv} (once; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *SAELENS_PINS], check=True)
    return python


def check(export_dir: Path, output_dir: Path, context_size: int) -> int:
    """Runs in the SAELens venv: every raw batch SAELens reads equals the extraction's files."""
    import importlib.metadata

    import datasets
    import numpy as np
    import torch
    from sae_lens.training.activations_store import ActivationsStore

    sys.path.insert(0, str(REPO))
    from extraction.constants import file_name, parse_hook  # plain Python: no Django, no torch

    columns = [name for name in datasets.load_from_disk(str(export_dir)).column_names if name != "token_ids"]
    tokens = np.load(output_dir / "tokens.npy")
    sequences = len(tokens) // context_size
    # SAELens drops a last batch smaller than store_batch_size_prompts: one that divides reads every sequence.
    prompts = next(b for b in (4, 3, 2, 1) if sequences % b == 0)
    print(f"SAELens {importlib.metadata.version('sae-lens')} (datasets {datasets.__version__}, torch "
          f"{torch.__version__}) reads {export_dir} with ActivationsStore(model=None, cached_activations_path=..., "
          f"context_size={context_size}, store_batch_size_prompts={prompts}):")
    matches = True
    for column in columns:
        stored = np.load(output_dir / file_name(*parse_hook(column)), mmap_mode="r")
        d_in = stored.shape[1]
        store = ActivationsStore(
            model=None, dataset=None, streaming=False, hook_name=column, hook_head_index=None,
            context_size=context_size, d_in=d_in, n_batches_in_buffer=2,
            total_training_tokens=sequences * context_size, store_batch_size_prompts=prompts,
            train_batch_size_tokens=32, prepend_bos=False, normalize_activations="none",
            device=torch.device("cpu"), dtype="float32", cached_activations_path=str(export_dir),
        )
        batches, read, same, shapes = 0, 0, True, "no batch"
        while True:
            try:
                acts, ids = store.get_raw_llm_batch(raise_on_epoch_end=True)
            except StopIteration:
                break
            if batches == 0:
                shapes = f"activations {tuple(acts.shape)} {acts.dtype}, token ids {tuple(ids.shape)} {ids.dtype}"
            rows = slice(read, read + acts.shape[0])
            same &= np.array_equal(acts.numpy(), np.asarray(stored[rows], dtype=np.float32))
            same &= np.array_equal(ids.numpy().astype(np.int64), tokens[rows].astype(np.int64))
            batches, read = batches + 1, read + acts.shape[0]
        whole = read == sequences * context_size
        matches &= same and whole
        print(f"  {column}: {read // context_size} sequences of {context_size} tokens (d_in {d_in}) in {batches} "
              f"batches of {shapes}; equal to {file_name(*parse_hook(column))} and tokens.npy: "
              f"{'yes' if same and whole else 'NO'}")
    dtype = json.loads((export_dir / "dataset_info.json").read_text())["features"][columns[0]]["dtype"]
    print(f"{len(columns)} hook columns stored as {dtype}, {sequences} sequences, {sequences * context_size:,} "
          f"tokens; matches the extraction's files: {'yes' if matches else 'NO'}")
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main())
