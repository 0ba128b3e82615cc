"""Failpoints: make a named step of a real worker fail on purpose.

Off by default. JOBSITE_FAILPOINTS holds JSON mapping a step name to one rule or a list:

    {"extraction.batch": {"action": "oom", "at": 3, "attempt": 1}}

Match keys (all optional): `at` (the step's index), `from` (index >= from), `attempt` (the
job's claim count), `min_batch_size` (batch_size >= this), `min_tokens` (the step's tokens,
samples x padded length, >= this: a device that holds fewer), `times` (fire at most this many
times per attempt: it counts the rule's firings since the job was claimed, and starts again
at every claim — each Proceed, each automatic retry, each Resume — and in every process;
combine it with `attempt` for a failure that must not come back after a Proceed). Actions:
`oom` (the CUDA allocator's RuntimeError), `error` (RuntimeError), `input` (JobInputError),
`timeout` (StepTimeout), `hang` (sleep until killed), `sleep` (sleep `seconds` then carry on),
`exit` (the process dies at once, like SIGKILL).
Pure Python: runners receive `make(...)`'s callable and never import Django.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Callable

from jobsite.errors import JobInputError, StepTimeout

ACTIONS = ("oom", "error", "input", "timeout", "hang", "sleep", "exit")


def parse(config: str | dict | None) -> dict[str, list[dict]]:
    if not config:
        return {}
    rules = json.loads(config) if isinstance(config, str) else config
    parsed = {}
    for name, value in rules.items():
        items = value if isinstance(value, list) else [value]
        for rule in items:
            if rule.get("action") not in ACTIONS:
                raise ValueError(f"Failpoint {name!r}: action must be one of {', '.join(ACTIONS)}.")
        parsed[name] = items
    return parsed


def make(config: str | dict | None, *, attempt: int = 1) -> Callable[[str, dict], None]:
    """The failpoint of one attempt: a worker calls make() once per claim, so `times` counts anew."""
    rules = parse(config)
    fired: Counter = Counter()

    def failpoint(name: str, context: dict) -> None:
        for number, rule in enumerate(rules.get(name, ())):
            if not _matches(rule, context, attempt) or fired[(name, number)] >= rule.get("times", 1 << 30):
                continue
            fired[(name, number)] += 1
            _act(name, rule, context)

    return failpoint


def _matches(rule: dict, context: dict, attempt: int) -> bool:
    index = context.get("index")
    if "at" in rule and index != rule["at"]:
        return False
    if "from" in rule and (index is None or index < rule["from"]):
        return False
    if "attempt" in rule and attempt != rule["attempt"]:
        return False
    if "min_batch_size" in rule and context.get("batch_size", 0) < rule["min_batch_size"]:
        return False
    if "min_tokens" in rule and context.get("tokens", 0) < rule["min_tokens"]:
        return False
    return True


def _act(name: str, rule: dict, context: dict) -> None:
    action = rule["action"]
    where = f"failpoint {name} at {context}"
    if action == "oom":
        raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({where})")
    if action == "error":
        raise RuntimeError(rule.get("message", f"Injected failure ({where})"))
    if action == "input":
        raise JobInputError(rule.get("message", f"Injected invalid input ({where})"))
    if action == "timeout":
        raise StepTimeout(f"Injected timeout ({where})")
    if action == "sleep":
        time.sleep(float(rule.get("seconds", 1)))
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action == "exit":
        os._exit(137)
