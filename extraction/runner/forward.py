"""One right-padded batch through the model, with hooks that capture each requested hook point.

The hooks only keep references (a copy only where the block writes into the tensor later);
on the cpu the writer reads each sample's rows straight out of the captured tensors, on cuda
the real tokens are gathered and cast on the device and copied to pinned host memory on a
side stream, so the copy overlaps the next batch's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PretrainedConfig

from extraction.constants import file_name
from extraction.runner.families import PRODUCED_AT, family_of, find_blocks
from extraction.runner.plan import STORAGE_DTYPES, ExtractionSpec, Plan


class _StopForward(Exception):
    """Raised by a hook once the last requested hook point is captured: later modules never run."""


def _tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class Capture:
    """The hooks of one plan on a loaded model. During a forward pass they fill `captured`
    ({file name: [batch, tokens, width]}); the pass stops right after the last one needed."""

    def __init__(self, model: torch.nn.Module, config: PretrainedConfig, plan: Plan):
        self.captured: dict[str, torch.Tensor] = {}
        self.shape = (0, 0)  # (batch, tokens) of the batch running: OPT's MLP sees them flattened
        self._pre: dict[int, torch.Tensor] = {}  # resid_pre kept for resid_mid = resid_pre + attention
        self._handles = []
        family, blocks = family_of(config), find_blocks(model, config)
        last, stop_after = plan.layers[-1], max(plan.hooks, key=PRODUCED_AT.__getitem__)
        for layer in plan.layers:
            block, wanted = blocks[layer], set(plan.hooks)
            if "resid_mid" in wanted:
                wanted |= {"resid_pre", "attention"}
            stops = {stop_after} if layer == last else set()

            def module(path: str, block=block) -> torch.nn.Module:
                return block.get_submodule(path)

            if "resid_pre" in wanted:
                self._hook(block, self._on_resid_pre(layer, plan.hooks, stops), pre=True)
            if "attention" in wanted:
                self._hook(module(family.attention), self._on_attention(layer, plan.hooks, stops))
            if "mlp_hidden" in wanted:
                self._hook(module(family.down), self._keeper(layer, "mlp_hidden", stops, first_input=True), pre=True)
            if "mlp" in wanted:
                self._hook(module(family.mlp), self._keeper(layer, "mlp", stops,
                                                            copy=family.mlp_written_in_place(config)))
            if "residual" in wanted:
                self._hook(block, self._keeper(layer, "residual", stops))

    def _hook(self, module: torch.nn.Module, function: Callable, *, pre: bool = False) -> None:
        if pre:
            self._handles.append(module.register_forward_pre_hook(function, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(function))

    def _keep(self, layer: int, hook: str, value: torch.Tensor) -> None:
        self.captured[file_name(layer, hook)] = value.reshape(*self.shape, -1)

    def _keeper(self, layer: int, hook: str, stops: set, *, copy: bool = False, first_input: bool = False):
        def keep(module, args, *rest):
            value = (args[0] if args else rest[0]["hidden_states"]) if first_input else _tensor(rest[-1])
            self._keep(layer, hook, value.clone() if copy else value)
            if hook in stops:
                raise _StopForward

        return keep

    def _on_resid_pre(self, layer: int, requested: list[str], stops: set):
        def keep(module, args, kwargs):
            value = args[0] if args else kwargs["hidden_states"]
            self._pre[layer] = value
            if "resid_pre" in requested:
                self._keep(layer, "resid_pre", value)
            if "resid_pre" in stops:
                raise _StopForward

        return keep

    def _on_attention(self, layer: int, requested: list[str], stops: set):
        def keep(module, args, output):
            value = _tensor(output)
            if "attention" in requested:
                self._keep(layer, "attention", value)
            if "resid_mid" in requested:
                # The same addition the block makes next (IEEE addition commutes): its bits exactly.
                pre = self._pre[layer]
                self._keep(layer, "resid_mid", pre + value.reshape(pre.shape))
            if stops & {"attention", "resid_mid"}:
                raise _StopForward

        return keep

    def take(self) -> dict[str, torch.Tensor]:
        captured, self.captured = self.captured, {}
        self._pre.clear()
        return captured

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class Rows:
    """One batch's activations on the host, in storage dtype, and where each sample goes."""

    values: dict[str, np.ndarray]  # [batch, width, hidden] on cpu; real tokens only, packed, on cuda
    packed: bool
    starts: list[int]  # first output row of each sample of the batch
    lengths: list[int]
    ready: Callable[[], None]  # returns once the device-to-host copies into `values` are complete

    def pieces(self, name: str):
        """(first output row, that sample's rows): contiguous slices, no copy."""
        value, position = self.values[name], 0
        for row, (start, length) in enumerate(zip(self.starts, self.lengths)):
            yield start, value[position : position + length] if self.packed else value[row, :length]
            position += length


def run_batch(
    model: torch.nn.Module, spec: ExtractionSpec, plan: Plan, batch: list[int], capture: Capture,
    copy_stream: torch.cuda.Stream | None,
) -> Rows:
    """One right-padded batch through the model."""
    lengths = np.diff(plan.offsets)
    counts = [int(lengths[i]) for i in batch]
    rows = Rows({}, copy_stream is not None, [int(plan.offsets[i]) for i in batch], counts, lambda: None)
    if not batch:
        return rows
    input_ids = torch.zeros((len(batch), counts[0]), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, i in enumerate(batch):
        # Right padding: real tokens keep positions 0..n-1 and, causally, never see a pad.
        input_ids[row, : counts[row]] = torch.from_numpy(plan.sample_ids(i))  # from the memory-mapped ids file
        attention_mask[row, : counts[row]] = 1
    storage, on_device = STORAGE_DTYPES[spec.storage_dtype], copy_stream is not None
    if on_device:
        # From pinned memory the copies are queued without waiting for the device to be idle.
        input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
    capture.shape = tuple(input_ids.shape)
    with torch.inference_mode():
        try:
            model(input_ids=input_ids.to(spec.device, non_blocking=on_device),
                  attention_mask=attention_mask.to(spec.device, non_blocking=on_device), use_cache=False)
        except _StopForward:
            pass
        captured = capture.take()
        if copy_stream is None:
            # On the cpu the writer reads each sample's rows straight out of these tensors.
            rows.values = {name: t.to(storage).contiguous().numpy() for name, t in captured.items()}
        else:
            rows.values, rows.ready = _to_host(captured, attention_mask.numpy().astype(bool), storage, copy_stream)
    return rows


def gather(captured: dict, mask: np.ndarray, storage: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor's real tokens, sample after sample, as [tokens, hidden] in storage dtype,
    computed where the tensor lives."""
    device = next(iter(captured.values())).device
    # The index is known on the host, so no boolean-mask nonzero() waits for the device.
    index = torch.from_numpy(np.flatnonzero(mask))
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    return {name: t.reshape(-1, t.shape[-1]).index_select(0, index).to(storage) for name, t in captured.items()}


def _to_host(captured: dict, mask: np.ndarray, storage: torch.dtype, copy_stream: torch.cuda.Stream):
    """Real tokens only, gathered and cast on the device, then copied into pinned host memory
    on a side stream: the copy overlaps the next batch's forward instead of waiting for it."""
    packed = gather(captured, mask, storage)
    copy_stream.wait_stream(torch.cuda.current_stream(next(iter(packed.values())).device))
    host = {}
    with torch.cuda.stream(copy_stream):
        for name, value in packed.items():
            host[name] = torch.empty(value.shape, dtype=storage, pin_memory=True)
            host[name].copy_(value, non_blocking=True)
    copied = torch.cuda.Event(blocking=True)  # the writer sleeps on it rather than spins
    copied.record(copy_stream)

    def ready() -> None:
        copied.synchronize()
        # Device memory of the gathered tensors is reused only once the copy has read it.
        packed.clear()

    return {name: value.numpy() for name, value in host.items()}, ready
