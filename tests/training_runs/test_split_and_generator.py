"""What the held-out recall measures and what the local generator writes, without a database."""

import re

import pytest

from tests.conftest import DEMO_CORPUS
from training_runs.generator import (
    STOPWORDS,
    LocalGenerator,
    chunk_text,
    keep_query,
    normal_form,
    run_generation,
    sentences,
)
from training_runs.trainer import split_pairs


def test_validation_and_test_pairs_are_whole_chunks_the_adapter_never_trains_on():
    pairs = [(pk, f"query {pk % 37} about chunk {pk // 3}", pk // 3) for pk in range(600)]
    pairs += [(1000, "a query every chunk shares", c) for c in range(0, 200, 7)]
    train, validation, test = split_pairs(pairs)
    parts = [{c for _q, c in part} for part in (train, validation, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    trained = {q for q, _c in train}
    assert not trained & {q for q, _c in validation + test}, "a validation or test query is never one trained on"
    assert 0.1 < len(parts[1]) / 200 < 0.22 and 0.13 < len(parts[2]) / 200 < 0.28
    # Whatever ids the database gave the pairs, and in whatever order, the split is the same.
    renumbered = [(pk + 5000, q, c) for pk, q, c in reversed(pairs)]
    assert [sorted(part) for part in split_pairs(renumbered)] == [sorted(part) for part in (train, validation, test)]


@pytest.mark.parametrize("chunks", [3, 4, 6])
def test_a_few_chunks_still_validate_test_and_train_on_one_each_at_least(chunks):
    train, validation, test = split_pairs([(i, f"q{i}", i % chunks) for i in range(chunks * 4)])
    counts = [len({c for _q, c in part}) for part in (train, validation, test)]
    assert min(counts) >= 1 and sum(counts) == chunks, counts


def test_two_chunks_train_on_one_and_validate_on_the_other_and_one_chunk_is_all_training():
    train, validation, test = split_pairs([(i, f"q{i}", i % 2) for i in range(8)])
    assert {c for _q, c in train} | {c for _q, c in validation} == {0, 1} and len(train) == len(validation) == 4
    assert test == []
    train, validation, test = split_pairs([(i, f"q{i}", 0) for i in range(6)])
    assert len(train) == 6 and validation == [] and test == []


@pytest.mark.parametrize("text, words", [
    ("Die Änderungen werden geprüft, bevor Müller sie übernimmt. Außerdem müssen Prüfungen stattfinden.",
     {"die", "änderungen", "werden", "geprüft", "bevor", "müller", "sie", "übernimmt", "außerdem", "müssen", "prüfungen",
      "stattfinden"}),
    ("Москва является столицей России. Население города превышает двенадцать миллионов человек.",
     {"москва", "является", "столицей", "россии", "население", "города", "превышает", "двенадцать", "миллионов",
      "человек"}),
])
def test_the_local_generator_writes_queries_from_whole_words_of_the_chunk_in_any_script(text, words):
    queries = LocalGenerator(queries_per_chunk=2).generate([text])[0]
    assert queries
    for query in queries:
        # Whatever frames the question ("what is the ..."), the chunk's own words are whole words.
        picked = set(query.split()) - {"what", "is", "the", "does", "it", "say", "about"}
        assert picked and picked <= words, (query, picked - words)


def test_a_query_never_ends_a_word_with_its_hyphen_or_keeps_a_lone_digit():
    text = "Bring your café card; the half-day astronomy- club meets at 7.30 in room 0 of the Old Hall."
    for seed in range(20):
        for query in LocalGenerator(queries_per_chunk=3, seed=seed).generate([text])[0]:
            assert not any(word.endswith("-") for word in query.split()), query
            assert "0" not in query.split() and "caf" not in query.split(), query


SWARM = "## Swarm season\n\nThe swarm season is the busiest time of the year. Check the frames weekly for queen cells."


def demo_chunks() -> list[str]:
    return [chunk for path in sorted(DEMO_CORPUS.glob("*.md"))
            for chunk in chunk_text(path.read_text(encoding="utf-8"), size=500, overlap=50)]


@pytest.fixture(scope="module")
def demo_queries() -> tuple[list[str], list[list[str]]]:
    chunks = demo_chunks()
    return chunks, LocalGenerator(queries_per_chunk=3).generate(chunks)


def test_local_queries_are_the_same_every_time_for_a_seed(demo_queries):
    chunks, queries = demo_queries
    assert LocalGenerator(queries_per_chunk=3).generate(chunks) == queries
    # Written down once: any machine, any Python hash seed, writes these for this chunk.
    chunk = SWARM
    assert LocalGenerator(queries_per_chunk=3).generate([chunk])[0] == [
        "when is swarm season", "how do i check the frames weekly for queen cells", "frames weekly for queen cells"]


def test_a_heading_and_a_definition_become_the_questions_a_person_asks():
    chunk = ("## Swarm season\n\nThe swarm season is the busiest time of the year. Check the frames weekly for queen "
             "cells. Hollis Brandt is the fleet steward.")
    queries = LocalGenerator(queries_per_chunk=20).generate([chunk])[0]
    assert {"when is swarm season", "what should i know about swarm season", "what is the swarm season",
            "who is the fleet steward", "who is hollis brandt"} <= set(queries), queries
    assert any(q.startswith("how do i check the frames") for q in queries), queries


def test_demo_queries_are_mostly_questions_and_every_section_is_asked_about(demo_queries):
    chunks, queries = demo_queries
    written = [q for chunk_queries in queries for q in chunk_queries]
    questions = [q for q in written if re.match(r"(what|how|when|who|why|can|should|must) ", q)]
    assert len(questions) > len(written) / 2, written[:20]
    asked_before = set()
    for chunk, chunk_queries in zip(chunks, queries, strict=True):
        assert len(chunk_queries) == 3 or len(chunk) < 200, (chunk, chunk_queries)
        for line in chunk.splitlines():
            # The section a chunk opens is asked about by name, unless a section of the same name
            # in another document was ("## Equipment"): the corpus never gets one question twice.
            if line.startswith("## ") and normal_form(line) not in asked_before:
                heading = set(normal_form(line).split()) - STOPWORDS
                assert any(heading <= set(normal_form(q).split()) for q in chunk_queries), (line, chunk_queries)
                asked_before.add(normal_form(line))


def test_no_query_copies_a_sentence_of_its_chunk(demo_queries):
    chunks, queries = demo_queries
    for chunk, chunk_queries in zip(chunks, queries, strict=True):
        own = {normal_form(sentence) for sentence in sentences(chunk)}
        assert not own & {normal_form(q) for q in chunk_queries}, chunk_queries


def test_no_query_is_written_twice_across_the_corpus(demo_queries):
    chunks, queries = demo_queries
    written = [normal_form(q) for chunk_queries in queries for q in chunk_queries]
    assert len(written) == len(set(written))
    # The same paragraph in two documents: the second copy gets other queries, not the same again.
    twice = LocalGenerator(queries_per_chunk=2).generate([chunks[5], chunks[5]])
    assert twice[1] and not set(twice[0]) & set(twice[1])


def test_a_resumed_generation_writes_what_an_uninterrupted_one_does():
    chunks = demo_chunks()[:60]
    saved: dict[int, list[str]] = {}

    def generate(pending, written=()):
        run_generation(list(pending), LocalGenerator(queries_per_chunk=2, written=written), batch_size=8,
                       save=lambda chunk_id, queries, dropped: saved.__setitem__(chunk_id, queries),
                       heartbeat=lambda: None, should_cancel=lambda: False, failpoint=lambda name, where: None)

    generate(enumerate(chunks))
    uninterrupted, saved = saved, {}
    generate(list(enumerate(chunks))[:27])  # stopped after 27 chunks, then resumed with what was stored
    generate(list(enumerate(chunks))[27:], written=[q for queries in saved.values() for q in queries])
    assert saved == uninterrupted


@pytest.mark.parametrize("query, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("swarm season", "too short"),
    ("bee hive", "too short"),
    ("%% 12 ## 7.30 !! ??", "not text"),
    ("what is " + "very " * 50 + "long", "too long"),
    ("THE SWARM SEASON IS THE BUSIEST TIME OF THE YEAR", "a copy of the chunk"),
    ("check the frames weekly for queen cells!", "a copy of the chunk"),
    ("when is swarm season", None),
])
def test_the_query_filter_says_why_it_drops_a_query(query, reason):
    chunk = SWARM
    assert keep_query(query, chunk) == reason


def test_the_causal_lm_generator_drops_and_counts_what_the_filter_refuses(tiny_model_dir, monkeypatch):
    from training_runs.generator import CausalLMGenerator

    generator = CausalLMGenerator(model_path=str(tiny_model_dir), queries_per_chunk=4)
    written = iter([
        "", "of", "The swarm season is the busiest time of the year.", "when do bees swarm\nand more",  # chunk 1
        "when do bees swarm", "\x00%%%\ufffd 12", "how many frames does a hive hold", "what eats queen cells",
    ])
    monkeypatch.setattr(generator.tokenizer, "batch_decode", lambda out, **kwargs: [next(written) for _ in out])
    chunks = ["The swarm season is the busiest time of the year. Bees swarm in May.",
              "Each hive holds ten frames. Wasps eat queen cells."]
    saved = []
    run_generation(list(enumerate(chunks)), generator, batch_size=8,
                   save=lambda chunk_id, queries, dropped: saved.append((chunk_id, queries, dropped)),
                   heartbeat=lambda: None, should_cancel=lambda: False, failpoint=lambda name, where: None)
    assert saved == [
        (0, ["when do bees swarm"], 3),
        # A query already written for another chunk is dropped as well.
        (1, ["how many frames does a hive hold", "what eats queen cells"], 2),
    ]
