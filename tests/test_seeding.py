"""Seed purposes: each kind of draw has a name, and the integer of every purpose that
existed before purposes were named is the integer it had then (so earlier runs reproduce);
new names hash into a range the tabled integers cannot reach."""

import pytest

from cdalign.core import seeding
from cdalign.core.seeding import HASHED_PURPOSE_FLOOR, TABLED_PURPOSES, derived_seed, evaluation_items, seed_purpose

# The integers as they were written by hand before purposes were named (cdalign/core/seeding.py
# at 5d18e97), with the indices each was used with: MIXTURE_ALONE_* + i for dataset i < 10.
INTEGERS_BEFORE = {
    ("train_batch", 0): 0,
    ("normalization_batch", 0): 1,
    ("eval_items", 0): 2,
    ("lora_init", 0): 3,
    ("composition_dual_batch", 0): 10,
    ("distill_lora_init", 0): 21,
    ("distill_batch", 0): 30,
    ("mixture_eval_triples", 0): 40,
    **{("mixture_alone_lora_init", i): 50 + i for i in range(10)},
    **{("mixture_alone_batch", i): 60 + i for i in range(10)},
    ("mixture_lora_init", 0): 70,
    ("mixture_train_batch", 0): 80,
    ("mixture_mass_samples", 0): 90,
}
CONSTANTS_BEFORE = {
    "TRAIN_BATCH": 0, "NORMALIZATION_BATCH": 1, "EVAL_ITEMS": 2, "LORA_INIT": 3, "COMPOSITION_DUAL_BATCH": 10,
    "DISTILL_LORA_INIT": 21, "DISTILL_BATCH": 30, "MIXTURE_EVAL_TRIPLES": 40, "MIXTURE_ALONE_LORA_INIT": 50,
    "MIXTURE_ALONE_BATCH": 60, "MIXTURE_LORA_INIT": 70, "MIXTURE_TRAIN_BATCH": 80, "MIXTURE_MASS_SAMPLES": 90,
}


def test_every_purpose_keeps_the_integer_it_had_before_purposes_were_named():
    now = {(name, i): seed_purpose(name, i) for name, i in INTEGERS_BEFORE}
    assert now == INTEGERS_BEFORE


def test_the_named_constants_keep_their_integers_and_index_arithmetic():
    assert {name: getattr(seeding, name) for name in CONSTANTS_BEFORE} == CONSTANTS_BEFORE
    for i in range(10):  # the mixture's ``MIXTURE_ALONE_* + i`` is the purpose's index i
        assert seeding.MIXTURE_ALONE_LORA_INIT + i == seed_purpose("mixture_alone_lora_init", i)
        assert seeding.MIXTURE_ALONE_BATCH + i == seed_purpose("mixture_alone_batch", i)


def test_the_table_holds_exactly_the_purposes_used_before():
    assert {(name, i) for name, (_, count) in TABLED_PURPOSES.items() for i in range(count)} == set(INTEGERS_BEFORE)


def test_derived_seeds_are_unchanged():
    # derived_seed(seed, purpose, index), computed with the code before purposes were named
    assert derived_seed(0, 0, 0) == 5589096508670902462
    assert derived_seed(7, 2, 5) == 6777217293103188534
    assert [s for _, s in evaluation_items(["a", "b"], 3, 11)] == [derived_seed(11, 2, k) for k in range(3)]


def test_tabled_integers_do_not_collide():
    integers = [first + i for first, count in TABLED_PURPOSES.values() for i in range(count)]
    assert len(integers) == len(set(integers))
    assert max(integers) < HASHED_PURPOSE_FLOOR


def test_a_new_name_hashes_above_the_table_and_is_stable():
    value = seed_purpose("some_new_purpose")
    assert HASHED_PURPOSE_FLOOR <= value < 2**63
    assert value == seed_purpose("some_new_purpose") != seed_purpose("some_new_purpose", 1)
    assert value == 6743507764894611559  # the hash is part of a run's results: it must not drift


def test_an_index_beyond_a_tabled_block_hashes_instead_of_running_into_the_next_block():
    assert seed_purpose("mixture_alone_lora_init", 10) >= HASHED_PURPOSE_FLOOR
    assert seed_purpose("mixture_alone_lora_init", 10) != seed_purpose("mixture_alone_batch", 0)


def test_a_negative_index_is_refused():
    with pytest.raises(ValueError, match="index must be >= 0"):
        seed_purpose("train_batch", -1)
