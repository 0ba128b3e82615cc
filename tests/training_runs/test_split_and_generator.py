"""What the held-out recall measures and what the local generator writes, without a database."""

import pytest

from training_runs.generator import TEMPLATES, LocalGenerator
from training_runs.trainer import split_pairs


def test_held_out_pairs_are_whole_chunks_the_adapter_never_trains_on():
    pairs = [(pk, f"query {pk % 37} about chunk {pk // 3}", pk // 3) for pk in range(600)]
    pairs += [(1000, "a query every chunk shares", c) for c in range(0, 200, 7)]
    train, held_out = split_pairs(pairs)
    train_chunks, held_chunks = {c for _q, c in train}, {c for _q, c in held_out}
    assert not train_chunks & held_chunks
    assert not {q for q, _c in train} & {q for q, _c in held_out}, "a held-out query is never one trained on"
    assert 0.1 < len(held_chunks) / 200 < 0.3
    # Whatever ids the database gave the pairs, and in whatever order, the split is the same.
    renumbered = [(pk + 5000, q, c) for pk, q, c in reversed(pairs)]
    again_train, again_held = split_pairs(renumbered)
    assert sorted(again_train) == sorted(train) and sorted(again_held) == sorted(held_out)


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_a_few_chunks_still_hold_one_out_and_train_on_the_rest(chunks):
    train, held_out = split_pairs([(i, f"q{i}", i % chunks) for i in range(chunks * 4)])
    assert len({c for _q, c in held_out}) == 1 and len({c for _q, c in train}) == chunks - 1


def test_one_chunk_is_all_training():
    train, held_out = split_pairs([(i, f"q{i}", 0) for i in range(6)])
    assert len(train) == 6 and held_out == []


@pytest.mark.parametrize("text, words", [
    ("Die Änderungen werden geprüft, bevor Müller sie übernimmt. Außerdem müssen Prüfungen stattfinden.",
     {"änderungen", "geprüft", "müller", "übernimmt", "außerdem", "prüfungen", "stattfinden", "werden", "bevor", "sie",
      "müssen", "die"}),
    ("Москва является столицей России. Население города превышает двенадцать миллионов человек.",
     {"москва", "является", "столицей", "россии", "население", "города", "превышает", "двенадцать", "миллионов",
      "человек"}),
])
def test_the_local_generator_writes_every_query_from_whole_words_in_any_script(text, words):
    queries = LocalGenerator(queries_per_chunk=3).generate([text])[0]
    assert len(queries) == 3
    for query in queries:
        picked = set(query.split()) - set(" ".join(t.format(a="", b="", c="") for t in TEMPLATES).split())
        assert picked and picked <= words, (query, picked - words)


def test_a_query_never_ends_a_word_with_its_hyphen_or_keeps_a_lone_digit():
    text = "Bring your café card; the half-day astronomy- club meets at 7.30 in room 0 of the Old Hall."
    for seed in range(20):
        for query in LocalGenerator(queries_per_chunk=3, seed=seed).generate([text])[0]:
            assert not any(word.endswith("-") for word in query.split()), query
            assert "0" not in query.split() and "caf" not in query.split(), query
