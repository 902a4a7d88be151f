"""Built-in oracles: each prefers what it says on obvious pairs, is order-blind, ties on equals, fails empties."""
import itertools
import subprocess
import sys

import pytest
import torch

from trainer import oracles
from trainer.oracles import BUILTIN, load_oracle

PROMPT = "How do I boil an egg?"
ANSWERS = [  # non-empty, of several lengths, styles and topics
    "Put the egg in boiling water for nine minutes, then cool it in cold water and peel it.",
    "Boil it.",
    "Place the eggs in a saucepan, cover them with cold water, bring to a rolling boil, then simmer for "
    "seven minutes for a jammy yolk or ten for a firm one. Transfer them to an ice bath before peeling",
    "The French Revolution began in 1789 and reshaped the politics of Europe for decades.",
    "Great question! Boiling eggs is easy and fun, and I'm happy to help. Enjoy your delicious eggs!",
    "Notwithstanding considerable methodological heterogeneity, thermal denaturation of ovalbumin proteins "
    "necessitates sustained immersion at approximately one hundred degrees Celsius.",
]
OBVIOUS = {  # judge: (prompt, the answer it must prefer, the other)
    "shorter": (PROMPT, "Boil it for nine minutes.", ANSWERS[2]),
    "longer": (PROMPT, ANSWERS[2], "Boil it for nine minutes."),
    "complete": ("What is the capital of France?", "It is Paris.", "The capital of France is Par"),
    "concise": ("What is the capital of France?", "It is Paris.",
                "The capital of France, a country in Western Europe with a long history, is the city of Par"),
    "relevant": (PROMPT, ANSWERS[0], ANSWERS[3]),
    "readable": ("Why exercise?", "It is good for you. You sleep well. You feel glad.", ANSWERS[5]),
    "positive": ("Can you help me?", "Of course, I'd love to help! Great question, and good luck with it.",
                 "No. That is a stupid question and I hate answering it."),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores, shared with whatever else runs: one thread is faster here
    for name in BUILTIN:      # loads all-MiniLM-L6-v2, cmudict and the VADER lexicon once for the module
        load_oracle(name)(PROMPT, "warm", "up")
    yield
    torch.set_num_threads(threads)


def test_every_builtin_has_an_obvious_case():
    assert set(OBVIOUS) == set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_prefers_the_obvious_answer(name):
    judge = load_oracle(name)
    prompt, better, worse = OBVIOUS[name]
    assert judge(prompt, better, worse) == "a"
    assert judge(prompt, worse, better) == "b"


@pytest.mark.parametrize("name", BUILTIN)
def test_swapping_the_answers_swaps_the_verdict(name):
    judge = load_oracle(name)
    mirror = {"a": "b", "b": "a", "tie": "tie"}
    for answer_a, answer_b in itertools.combinations(ANSWERS, 2):
        assert judge(PROMPT, answer_b, answer_a) == mirror[judge(PROMPT, answer_a, answer_b)]


@pytest.mark.parametrize("name", BUILTIN)
def test_identical_answers_tie_and_empty_answers_lose(name):
    judge = load_oracle(name)
    for answer in ANSWERS:
        assert judge(PROMPT, answer, answer) == "tie"
        for empty in ("", "  \n"):
            assert judge(PROMPT, answer, empty) == "a"
            assert judge(PROMPT, empty, answer) == "b"
    assert judge(PROMPT, "", " ") == "tie"


def test_longer_and_shorter_disagree_on_every_decided_pair():
    decided = 0
    for answer_a, answer_b in itertools.permutations(ANSWERS, 2):
        verdicts = {oracles.shorter(PROMPT, answer_a, answer_b), oracles.longer(PROMPT, answer_a, answer_b)}
        assert verdicts in ({"tie"}, {"a", "b"})  # same margin, so they tie on the same pairs
        decided += verdicts == {"a", "b"}
    assert decided >= len(ANSWERS)


def test_relevant_is_deterministic():
    first = oracles.embed(ANSWERS[0])
    oracles.embed.cache_clear()
    assert first.shape == (384,) and torch.equal(oracles.embed(ANSWERS[0]), first)


def test_load_oracle_names_the_builtins_when_unknown():
    assert load_oracle("trainer.oracles:longer") is oracles.longer
    for spec in ("politest", "ends_properly", "trainer.oracles:nothing"):
        with pytest.raises(ValueError, match="shorter, longer, complete, concise, relevant, readable, positive"):
            load_oracle(spec)


def test_importing_the_oracles_loads_no_scorer():
    code = "import sys, trainer.oracles; print(sorted({'torch', 'textstat', 'vaderSentiment'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
