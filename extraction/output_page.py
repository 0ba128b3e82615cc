"""What the files page shows of an output beyond its file list: how to load it, one sample's
tokens shaded by their rows' norms, and a histogram of row norms per file. Everything is read
through extraction.reader, so a partial run shows its checkpointed samples only."""

from __future__ import annotations

import math

import numpy as np

from extraction.constants import file_name, transformerlens_name
from extraction.reader import Output, OutputError, open_output

# Bytes of rows read for all the histograms of one page view together: a page over a run of
# gigabytes reads a spread of its rows, never all of them.
HISTOGRAM_BUDGET = 16 * 2**20
MIN_ROWS_PER_FILE = 256
BINS = 24
# A sample longer than this shows its first tokens only (a page of 10,000 spans is no page).
TOKENS_SHOWN = 2000


def open_for_page(path) -> tuple[Output | None, str]:
    """(the output, '') or (None, the sentence saying why it cannot be read)."""
    try:
        return open_output(path), ""
    except OutputError as exc:
        return None, str(exc)


def snippets(output: Output, path: str, extraction_id: int) -> dict[str, str]:
    """Code that loads this run, with its own path, point and sample filled in."""
    layer, hook = output.points[0] if output.points else (0, "residual")
    name, sample = transformerlens_name(layer, hook), int(output.done_samples()[0]) if output.samples_done else 0
    reader = (f'from extraction.reader import open_output\n\nrun = open_output("{path}")\nprint(run.describe())\n'
              f'rows = run.sample_rows({sample}, "{name}")  # [tokens of sample {sample}, width]\n'
              f"tokens = run.token_strings({sample})\n")
    loader = (f'from extraction.loader import ActivationLoader\n\n'
              f'loader = ActivationLoader("{path}", "{name}", batch_size=4096, buffer_bytes=1 << 30, seed=0,\n'
              f'                          skip_first_token=True)\nfor batch in loader:  # [4096, width] tensors, shuffled\n'
              f"    ...\n")
    numpy = (f'import numpy as np\n\noffsets = np.load("{path}/offsets.npy")  # sample i is rows offsets[i]:offsets[i + 1]\n'
             f'tokens = np.load("{path}/tokens.npy")\nrows = np.load("{path}/{file_name(layer, hook)}", mmap_mode="r")\n'
             f"sample = rows[offsets[{sample}] : offsets[{sample + 1}]]\n")
    export = f"python manage.py extraction export {extraction_id} --format hf-datasets /path/to/new/folder\n"
    return {"reader": reader, "loader": loader, "numpy": numpy, "export": export}


def sample_view(output: Output, sample: int | None, point: str | None) -> dict:
    """One done sample's tokens, each shaded by its row's norm at the chosen (layer, hook point)."""
    done = output.done_samples()
    points = [{"value": transformerlens_name(*p), "label": f"{transformerlens_name(*p)} ({p[1]})"}
              for p in output.points]
    view = {"points": points, "done": len(done), "samples": output.num_samples, "error": ""}
    if not len(done) or not points:
        view["error"] = "No sample is done yet." if points else "This output holds no activation files."
        return view
    chosen = next((p for p in output.points if transformerlens_name(*p) == point), output.points[0])
    if sample is None:
        sample = int(done[0])
    view.update(point=transformerlens_name(*chosen), sample=sample)
    try:
        rows = output.sample_rows(sample, *chosen)
        strings = output.token_strings(sample)
    except OutputError as exc:
        view["error"] = str(exc)
        return view
    norms = np.linalg.norm(rows[:TOKENS_SHOWN].astype(np.float32), axis=1)
    finite = norms[np.isfinite(norms)]
    low, top = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    start = int(output.offsets[sample])
    view["tokens"] = [
        {"text": text, "row": start + i, "norm": f"{norm:.4g}", "alpha": f"{_shade(norm, low, top):.2f}"}
        for i, (text, norm) in enumerate(zip(strings[:TOKENS_SHOWN], norms.tolist()))
    ]
    view["cut"] = max(0, len(strings) - TOKENS_SHOWN)
    view["max_norm"], view["min_norm"] = f"{top:.4g}", f"{low:.4g}"
    return view


def _shade(norm: float, low: float, top: float) -> float:
    """From 0.05 (the sample's smallest norm) to 1 (its largest): norms of one sample are often close,
    and shading from zero would colour every token alike. An infinite norm (float16 overflow) is full."""
    if not math.isfinite(norm):
        return 1.0
    return 0.05 + 0.95 * (norm - low) / (top - low) if top > low else 1.0


def _spread_rows(output: Output, count: int) -> np.ndarray:
    """`count` row indices spread evenly over the rows of done samples (a partial run's others are zeros)."""
    done = output.done_samples()
    lengths = np.diff(output.offsets)[done]
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if not total:
        return np.zeros(0, dtype=np.int64)
    positions = np.unique(np.linspace(0, total - 1, num=min(count, total)).astype(np.int64))
    owner = np.searchsorted(ends, positions, side="right")
    return output.offsets[done[owner]] + positions - (ends[owner] - lengths[owner])


def histograms(output: Output) -> list[dict]:
    """Per file, a histogram of row norms as SVG bars, over an even spread of its done rows."""
    if not output.points or not output.samples_done:
        return []
    budget = HISTOGRAM_BUDGET // len(output.points)
    charts = []
    for layer, hook in output.points:
        array = output.stored(layer, hook)
        count = max(MIN_ROWS_PER_FILE, budget // (array.shape[1] * array.dtype.itemsize))
        index = _spread_rows(output, count)
        norms = np.linalg.norm(np.asarray(array[index], dtype=np.float32), axis=1)
        charts.append(_bars(norms, name=file_name(layer, hook), title=transformerlens_name(layer, hook)))
    return charts


def _bars(norms: np.ndarray, *, name: str, title: str) -> dict:
    width, height, left, bottom, top = 320, 120, 8, 22, 8
    finite = norms[np.isfinite(norms)]
    chart = {"name": name, "title": title, "rows": len(norms), "infinite": int(len(norms) - len(finite)),
             "width": width, "height": height, "bars": []}
    if not finite.size:
        return chart
    low, high = float(finite.min()), float(finite.max())
    counts, edges = np.histogram(finite, bins=BINS, range=(low, high if high > low else low + 1))
    plot_h, bar_w = height - bottom - top, (width - 2 * left) / BINS
    tallest = int(counts.max())
    for i, count in enumerate(counts.tolist()):
        bar_h = round(plot_h * count / tallest, 1) if tallest else 0
        chart["bars"].append({"x": round(left + i * bar_w, 1), "y": round(top + plot_h - bar_h, 1), "w": round(bar_w - 1, 1),
                              "h": bar_h, "label": f"{edges[i]:.3g}–{edges[i + 1]:.3g}: {count:,} rows"})
    chart.update(low=f"{low:.3g}", high=f"{high:.3g}", median=f"{float(np.median(finite)):.3g}",
                 axis_y=height - bottom, label_y=height - 6, right=width - left)
    return chart
