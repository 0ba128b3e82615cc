"""Phase 1 of a training run: cut a corpus into chunks and write queries for every chunk.

Pure Python + torch/transformers (no Django): the task passes callbacks that store a
chunk's pairs atomically, heartbeat, and say whether to stop.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence

from jobsite.errors import Cancelled, JobInputError

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers him his how i if in into is it its itself just may me more most must my
    no nor not now of off on once only or other our out over own same she should so some such than that
    the their them then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your one two each every per via its they're
    it's don't can't""".split()
)
# Words that can open a sentence as its subject but never name what a query asks about.
PRONOUNS = frozenset("""it this that there these those they he she we i each every one which what who its their our his
    her some all both most many any nobody none here such another other either neither""".split())
# Verbs that open an instruction ("Check the frames weekly."): the chunk answers "how do i ...".
IMPERATIVES = frozenset("""add adjust ask attach avoid book bring call change charge check choose clean close collect
    cover empty fill fit follow give hang inflate keep label leave lift lock log make mark measure oil open pack pay
    photograph place post print put read record remove replace report return rinse run send set sign spend squeeze
    start stop store submit switch take tell test tighten turn upload use wait wash water wear write""".split())
QUESTION_WORDS = frozenset("how what when where why who which".split())
# Where a clause ends: a question keeps the words before it.
CLAUSE_END = re.compile(r"[,;:()\u2013\u2014]| (?:because|which|who|whose|so that|unless|although|while|whereas|but|"
                        r"and then|except|if|or else) ", re.I)
TIME = re.compile(r"^(?:\d{1,2}[:.]\d{2}|\d{1,2}(?:am|pm)|mondays?|tuesdays?|wednesdays?|thursdays?|fridays?|"
                  r"saturdays?|sundays?|weekends?|weekdays?|january|february|march|april|may|june|july|august|"
                  r"september|october|november|december|spring|summer|autumn|winter|dawn|dusk|noon|midnight|"
                  r"the (?:first|last|end|start|morning|evening)|every|each|night)\b", re.I)
WHEN_PREPOSITIONS = r"at|on|from|between|before|after|by|until|every|each|in"
QUERY_LIMIT = 200  # characters; what a generator writes at most
# Words that join two runs of content words into one phrase: "list of members", "tide and weather".
LINKS = frozenset("of for on in with from and".split())
# Words that say how or whether, not what: a key phrase never holds one.
PHRASE_BREAKS = frozenset("""never always often usually sometimes still already even just however whether also only
    then than else instead later least much many well cannot""".split())
NUMBER_WORDS = frozenset("""another one two three four five six seven eight nine ten eleven twelve fifteen twenty
    thirty forty fifty hundred""".split())
# Words and punctuation marks, in order: a phrase stops at a comma.
TOKEN = re.compile(r"\d+(?:[.:]\d+)?|[\w'\u2019\-]+|[^\w\s]")
# A word in any script (letters, with an apostrophe or a hyphen inside: "don't", "half-day";
# never one at its end), or a number ("9", "7.30").
WORD = re.compile(r"[^\W\d_](?:[^\W\d_]|['\u2019\-](?=[^\W\d_]))+|\d+(?:[.:]\d+)?")


def check_chunking(size: int, overlap: int) -> None:
    """A chunk size and overlap chunk_text can cut with, or a sentence saying which is wrong."""
    if not 50 <= size <= 20000:
        raise JobInputError("The chunk size must be between 50 and 20,000 characters.", field="chunk_size")
    if not 0 <= overlap < size // 2:
        raise JobInputError(f"The overlap must be between 0 and {size // 2 - 1} characters for a chunk size of {size:,}.",
                            field="chunk_overlap")


def chunk_text(text: str, *, size: int, overlap: int) -> list[str]:
    """Paragraphs packed up to `size` characters; a longer paragraph is cut at word
    boundaries with `overlap` characters repeated at the start of the next piece."""
    check_chunking(size, overlap)
    pieces: list[str] = []
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        while len(paragraph) > size:
            cut = paragraph.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            pieces.append(paragraph[:cut].strip())
            restart = paragraph.rfind(" ", 0, max(0, cut - overlap)) + 1 if overlap else cut
            paragraph = paragraph[restart if 0 < restart < cut else cut :].strip()
        pieces.append(paragraph)
    chunks: list[str] = []
    for piece in pieces:
        # A heading starts a chunk, and never stays alone: a chunk of only "# Beehive Notes"
        # says nothing to retrieve, yet would get queries and win searches for its words.
        heading_only = bool(chunks) and all(line.startswith("#") for line in chunks[-1].splitlines() if line.strip())
        if chunks and (heading_only or (len(chunks[-1]) + 2 + len(piece) <= size and not piece.startswith("#"))):
            chunks[-1] = f"{chunks[-1]}\n\n{piece}"
        else:
            chunks.append(piece)
    return [c for c in chunks if c]


# What a model's byte-level decoding can yield that is not text: NUL (which PostgreSQL text
# cannot hold), other control characters, and U+FFFD for a character cut in half.
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")


def clean_query(text: str, limit: int | None = QUERY_LIMIT) -> str:
    """A generated query as one line of text, at most `limit` characters."""
    first_line = text.strip().split("\n")[0]
    return " ".join(_NOT_TEXT.sub("", first_line).split())[:limit]


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


MIN_QUERY_WORDS, MIN_QUERY_CHARS = 3, 12


def normal_form(text: str) -> str:
    """What two texts share when they say the same words: case and punctuation aside."""
    return " ".join(word.lower() for word in WORD.findall(text))


def sentences(chunk: str) -> list[str]:
    """The chunk's sentences, each heading line one of them."""
    pieces = re.split(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])|\n+", chunk)
    return [piece.strip() for piece in pieces if piece.strip()]


def keep_query(query: str, chunk: str) -> str | None:
    """Why a generated query is not worth a reviewer's time, or None to keep it.

    Both generators use it, so a model's query and a local one meet the same bar."""
    if not query.strip():
        return "empty"
    visible = [ch for ch in query if not ch.isspace()]
    if _NOT_TEXT.search(query) or sum(ch.isalpha() for ch in visible) < len(visible) / 2:
        return "not text"
    if len(query.split()) < MIN_QUERY_WORDS or len(query) < MIN_QUERY_CHARS:
        return "too short"
    if len(query) > QUERY_LIMIT:
        return "too long"
    words = normal_form(query)
    if words == normal_form(chunk) or words in {normal_form(sentence) for sentence in sentences(chunk)}:
        return "a copy of the chunk"
    return None


class Queries(list):
    """One chunk's queries, and how many the filter dropped on the way."""

    def __init__(self, queries=(), dropped: int = 0):
        super().__init__(queries)
        self.dropped = dropped


def _clause(text: str, limit: int = 9) -> str:
    """The words of `text` up to its first clause boundary, at most `limit` of them, ending
    on a word that says something ("in the wooden box", not "in the wooden box at")."""
    words = CLAUSE_END.split(text, maxsplit=1)[0].rstrip(".!?").split()[:limit]
    while len(words) > 1 and _dangles(words[-1]):
        words.pop()
    return " ".join(words)


def _phrase(words: list[str]) -> str:
    return " ".join(words).lower()


def _dangles(word: str) -> bool:
    """A word a query cannot end on: it says how much or what happened to a thing it then
    leaves out ("vent open for another 20", "the bench marked")."""
    lower = word.lower()
    return (lower in STOPWORDS | PHRASE_BREAKS | LINKS | NUMBER_WORDS or lower.replace(".", "").isdigit()
            or (len(lower) > 4 and lower.endswith(("ed", "ly"))))


def _plural(word: str) -> bool:
    return len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is"))


def _base_verb(verb: str) -> str:
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("sses", "shes", "ches", "xes", "zes", "oes")):
        return verb[:-2]
    return verb[:-1]


def _subject_ok(subject: str, most: int = 6) -> bool:
    words = subject.split()
    return 1 <= len(words) <= most and words[0].lower() not in PRONOUNS and all(WORD.fullmatch(w) for w in words)


def _words(text: str) -> list[str]:
    """Every word of `text`, "a" and "B" included, lowercased."""
    return [token.lower() for token in TOKEN.findall(text) if token[0].isalnum()]


def heading_questions(heading: str) -> list[str]:
    """"## Swarm season" -> "when is swarm season", "what should i know about swarm season"."""
    level = len(heading) - len(heading.lstrip("#"))
    words = _words(heading.lstrip("#"))
    if not words:
        return []
    topic = " ".join(words)
    if words[0] in QUESTION_WORDS:
        if words[:2] == ["how", "to"] and len(words) > 2:
            return [f"how do i {' '.join(words[2:])}"]
        if len(words) > 2 and words[1] in ("we", "i", "you"):  # "Why we review" -> "why do we review"
            return [f"{words[0]} do {' '.join(words[1:])}"]
        return [f"{topic} explained"]
    the = "" if words[0] in ("the", "a", "an") else "the "
    if level == 1:  # the document's title
        return [f"what is in {the}{topic}", f"what does {the}{topic} cover"]
    asked = [f"what should i know about {topic}"]
    if words[0].endswith("ing"):  # "Booking and returning a bike" is done, not defined
        return asked
    if words[-1] in ("season", "day", "days", "week", "month", "time", "deadline", "deadlines", "dates"):
        asked.insert(0, f"when is {topic}")
    elif len(words) > 1:
        head = next((w for w, after in zip(words, [*words[1:], ""]) if after in LINKS | {"", "to"}), words[-1])
        asked.insert(0, f"what {'are' if _plural(head) else 'is'} {the}{topic}")
    return asked


DEFINITION = re.compile(r"^(?P<subject>[^,;:()]{2,60}?)\s+(?P<verb>is|are)\s+(?P<article>an?|the|one of the)\s+"
                        r"(?P<rest>.+)$", re.I)
NAMED = re.compile(r"^(?P<role>[^,;:()]{4,80}?)\s+is\s+(?P<name>[A-Z][\w'\-]+(?: [A-Z][\w'\-]+)+)\b")
MODAL = re.compile(r"^(?P<subject>[^,;:()]{2,50}?)\s+(?P<modal>must|should|can|may)\s+(?P<rest>(?!not\b).+)$")
WHEN = re.compile(rf"^(?P<before>[^,;:()]{{3,60}}?)\s+(?:{WHEN_PREPOSITIONS})\s+(?P<after>.+)$")


def sentence_questions(sentence: str) -> list[str]:
    """Questions a person would ask that this sentence answers: definitions ("what is X"),
    names ("who is the fleet steward"), instructions ("how do i ..."), rules ("can visitors
    ...") and times ("when does the canteen open")."""
    if sentence.lstrip().startswith("#") or len(WORD.findall(sentence)) < 4:
        return []
    text = " ".join(sentence.split()).rstrip(".!?")
    first = text.split()[0].lower()
    asked: list[str] = []
    if named := NAMED.match(text):
        role, name = named["role"], named["name"]
        if _subject_ok(role, 8) or role.split()[0].lower() == "the":
            asked.append(f"who is {_phrase(role.split())}")
        asked.append(f"who is {name.lower()}")
    if (definition := DEFINITION.match(text)) and _subject_ok(definition["subject"]):
        subject, verb = definition["subject"], definition["verb"].lower()
        what = _clause(f"{definition['article']} {definition['rest']}", 10).lower()
        # "Hollis Brandt is the fleet steward": a person, asked about with "who".
        person = len(subject.split()) >= 2 and all(w[0].isupper() for w in subject.split()) and first != "the"
        asked.append(f"{'who' if person else 'what'} {verb} {subject.lower()}")
        if len(what.split()) >= 3 or person:
            asked.append(f"{'who' if person else 'what'} {'is' if verb == 'is' else 'are'} {what}")
    if first in IMPERATIVES:
        asked.append(f"how do i {_clause(text).lower()}")
    elif first in ("never", "always") and len(text.split()) > 2 and text.split()[1].lower() in IMPERATIVES:
        asked.append(f"{'can' if first == 'never' else 'should'} i {_clause(' '.join(text.split()[1:])).lower()}")
    if (modal := MODAL.match(text)) and (_subject_ok(modal["subject"], 5) or first in ("anyone", "everyone", "you")):
        subject = "i" if first == "you" else modal["subject"].lower()
        verb = "can" if modal["modal"] in ("can", "may") else modal["modal"]
        asked.append(f"{verb} {subject} {_clause(modal['rest'], 8).lower()}")
    if (when := WHEN.match(text)) and TIME.match(when["after"]) and _subject_ok(when["before"], 6):
        words = when["before"].lower().split()
        if any(w in STOPWORDS - {"the", "a", "an", "is", "are"} or not WORD.fullmatch(w) for w in words[:-1]):
            pass  # not a plain "subject verb": "predicted low water was 0.3 metres"
        elif len(words) >= 3 and words[-2] in ("is", "are"):
            asked.append(f"when {words[-2]} {' '.join(words[:-2])} {words[-1]}")
        elif len(words) >= 2 and words[-1].endswith("s") and not words[-1].endswith("ss") \
                and words[-1] not in STOPWORDS:
            asked.append(f"when does {' '.join(words[:-1])} {_base_verb(words[-1])}")
        elif len(words) >= 2 and _plural(words[0]) and words[1] not in STOPWORDS:
            asked.append(f"when do {' '.join(words)}")
    return asked


def key_phrases(sentence: str) -> list[str]:
    """Contiguous runs of content words of one sentence (a link word may join two runs, a
    punctuation mark ends one): the phrase a person types into a search box, never a bag of
    words from all over the sentence."""
    phrases, run = [], []
    tokens = TOKEN.findall(sentence)
    for position, token in enumerate(tokens + [""]):
        lower = token.lower()
        content = (bool(token) and lower not in STOPWORDS | PHRASE_BREAKS and bool(WORD.fullmatch(token))
                   and len(token) > 1)
        joins = (lower in LINKS and run and position + 1 < len(tokens) and tokens[position + 1].lower() not in STOPWORDS
                 and run[-1].lower() not in LINKS)
        if content or joins:
            run.append(token)
            continue
        # A phrase names a thing: no link word or "-ed"/"-ly" word at either end ("preheated for 30 minutes").
        run = run[:6]
        while run and _dangles(run[-1]):
            run.pop()
        while run and (run[0].lower() in LINKS or (len(run[0]) > 4 and run[0].lower().endswith(("ed", "ly")))):
            run.pop(0)
        if len(run) >= 2:
            phrases.append(" ".join(run))
        run = []
    return phrases


class LocalGenerator:
    """Queries a person would type about a chunk: offline, CPU, the same output on every machine.

    Questions from the chunk's headings and from its definitions, instructions, rules and
    times come first, then key phrases of its own sentences. A query is never a copy of a
    sentence, and never one already written for another chunk of the corpus: the generator
    remembers every query it wrote (and those `written` before, on a resume)."""

    name = "local"

    def __init__(self, *, queries_per_chunk: int = 2, seed: int = 0, written: Iterable[str] = ()):
        if not 1 <= queries_per_chunk <= 20:
            raise JobInputError("queries_per_chunk must be between 1 and 20.")
        self.queries_per_chunk = queries_per_chunk
        self.seed = seed
        self.written = {normal_form(query) for query in written}

    def generate(self, chunks: Sequence[str]) -> list[Queries]:
        return [self.queries(chunk) for chunk in chunks]

    def candidates(self, chunk: str) -> list[str]:
        """Every query this chunk could get, best first: headings, then the sentences'
        questions, then key phrases, taking turns so that a chunk's queries differ in kind."""
        rng = random.Random(_stable_seed(self.seed, chunk))
        lines = sentences(chunk)
        headings = [q for line in lines if line.startswith("#") for q in heading_questions(line)]
        asked = [q for line in lines for q in sentence_questions(line)]
        rng.shuffle(asked)
        phrases = [p for line in lines if not line.startswith("#") for p in key_phrases(line)]
        # The longest phrases say most; the seed orders phrases of one length. Two words make a
        # question about a thing; two names ("Hollis Brandt") are asked about by the sentences.
        phrases.sort(key=lambda p: (-min(len(p.split()), 4), rng.random()))
        phrases = [p.lower() if len(p.split()) >= MIN_QUERY_WORDS else f"what is the {p.lower()}" for p in phrases
                   if len(p.split()) >= MIN_QUERY_WORDS or not any(word[0].isupper() for word in p.split())]
        kinds = [headings[:1], asked[:1], phrases[:1], asked[1:], headings[1:], phrases[1:]]
        return [query for kind in kinds for query in kind]

    def queries(self, chunk: str) -> Queries:
        chosen = Queries()
        for query in self.candidates(chunk):
            query = clean_query(query)
            words = normal_form(query)
            if keep_query(query, chunk) is None and words not in self.written:
                self.written.add(words)
                chosen.append(query)
                if len(chosen) == self.queries_per_chunk:
                    break
        if not chosen:  # a chunk too short for a question still gets a pair to review
            words = [w.lower() for w in WORD.findall(chunk)][:6]
            chosen.append(f"what does it say about {' '.join(words)}" if words else clean_query(chunk)[:60])
            self.written.add(normal_form(chosen[0]))
        return chosen


class CausalLMGenerator:
    """Queries written by a local transformers causal LM with batched `generate`."""

    name = "causal_lm"
    PROMPT = "Passage: {chunk}\nA question this passage answers:"

    def __init__(self, *, model_path: str, queries_per_chunk: int = 2, device: str = "cpu", max_new_tokens: int = 24,
                 seed: int = 0, written: Iterable[str] = ()):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise JobInputError(f"The query generator model at {model_path} cannot be loaded: {exc}") from exc
        self.tokenizer.padding_side = "left"  # generation continues after the prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(device).eval()
        self.device, self.torch = device, torch
        self.queries_per_chunk, self.max_new_tokens, self.seed = queries_per_chunk, max_new_tokens, seed
        # Shares what was written: a fallback query is never one the model wrote for another chunk.
        self.fallback = LocalGenerator(queries_per_chunk=queries_per_chunk, seed=seed, written=written)
        self.written = self.fallback.written

    def generate(self, chunks: Sequence[str]) -> list[Queries]:
        torch = self.torch
        prompts = [self.PROMPT.format(chunk=chunk[:600]) for chunk in chunks]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=384)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        torch.manual_seed(_stable_seed(self.seed, *chunks) % 2**31)
        with torch.inference_mode():
            out = self.model.generate(
                **batch, do_sample=True, top_p=0.9, max_new_tokens=self.max_new_tokens,
                num_return_sequences=self.queries_per_chunk, pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        results = []
        for i, chunk in enumerate(chunks):
            kept = Queries()
            for text in texts[i * self.queries_per_chunk : (i + 1) * self.queries_per_chunk]:
                query = clean_query(text, limit=None)  # a query too long is dropped, never cut mid-word
                # A repeat of a query written for another chunk is dropped too: it would teach nothing.
                if keep_query(query, chunk) is not None or normal_form(query) in self.written:
                    kept.dropped += 1
                    continue
                self.written.add(normal_form(query))
                kept.append(query)
            # A model that writes nothing usable for a chunk must not leave it without a pair.
            results.append(kept if kept else Queries(self.fallback.queries(chunk), dropped=kept.dropped))
        return results


def run_generation(
    chunks: Iterable[tuple[int, str]],
    generator,
    *,
    batch_size: int,
    save: Callable[[int, list[str], int], None],
    heartbeat: Callable[[], None],
    should_cancel: Callable[[], bool],
    failpoint: Callable[[str, dict], None],
    start_index: int = 0,
) -> int:
    """Generate for (chunk id, text) pairs in order, `save` each chunk's queries and how many
    the filter dropped; returns the number of chunks processed. `start_index` numbers
    failpoints across resumes."""
    pending = list(chunks)
    processed = 0
    for offset in range(0, len(pending), batch_size):
        heartbeat()
        if should_cancel():
            raise Cancelled(f"Stopped after {processed} chunks.")
        batch = pending[offset : offset + batch_size]
        for position, _ in enumerate(batch):
            failpoint("training.generate", {"index": start_index + processed + position})
        for (chunk_id, _), queries in zip(batch, generator.generate([text for _, text in batch]), strict=True):
            save(chunk_id, list(queries), getattr(queries, "dropped", 0))
            processed += 1
    return processed
