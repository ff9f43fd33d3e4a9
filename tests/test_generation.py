"""generate_batched and generate_batched_ids against one prompt at a time, and the free-generation scorer built on
them."""

import pytest

from conftest import greedy_ids_one_at_a_time, greedy_one_at_a_time
from prune_lightning import EditRequest
from prune_lightning.generation import generate_batched, generate_batched_ids
from prune_lightning.metrics import FreeGenerationScore
from prune_lightning.metrics.quality import update_free_generation
from prune_lightning.models import load_causal_lm, load_tokenizer

PROMPTS = [
    "The capital of France is",
    "Paris",
    "Q: What is 1 + 2? A: Let's think step by step. One plus two is three. Therefore, the answer is:",
    "The mother tongue of Danielle Darrieux is French. Toko Yasuda plays the",
    "Rome",
]


def test_generate_batched_matches_one_prompt_at_a_time(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    expected = greedy_one_at_a_time(model, tokenizer, PROMPTS, max_new_tokens=6)
    assert len(set(expected)) > 1  # the prompts do lead to different continuations
    model.train()  # dropout on: the call must switch to eval mode and back
    assert tokenizer.padding_side == "right"
    for batch_size in (2, 5):
        assert generate_batched(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=batch_size) == expected
    assert model.training and tokenizer.padding_side == "right"


def test_generate_batched_ids_are_the_new_tokens_up_to_eos(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    model.eval()
    expected = [greedy_ids_one_at_a_time(model, tokenizer, prompt, 6) for prompt in PROMPTS]
    got = generate_batched_ids(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    assert got == expected
    assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in got] == \
        generate_batched(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=5)
    # A model that ends at once: nothing new, not the padding after it.
    model.generation_config.eos_token_id = sorted({t for row in expected for t in row[:1]})
    assert all(row == [] for row, first in zip(
        generate_batched_ids(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=5), expected) if first)


def test_generate_batched_truncates_long_prompts_from_the_left(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    long_prompt = " ".join(["Paris is in France."] * 60) + " The capital of Italy is"
    ids = tokenizer(long_prompt)["input_ids"]
    assert len(ids) > 128  # the tiny models' context
    tail = tokenizer.decode(ids[-(128 - 4):])
    assert tokenizer(tail)["input_ids"] == ids[-(128 - 4):]
    with pytest.warns(UserWarning, match="1 of 2 prompts .* truncated from the left"):
        out = generate_batched(model, tokenizer, [long_prompt, "Rome"], max_new_tokens=4, batch_size=2)
    assert out == greedy_one_at_a_time(model, tokenizer, [tail, "Rome"], max_new_tokens=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(max_new_tokens=128), "max_new_tokens=128 leaves no room"),
    (dict(prompts="Paris"), "not a single string"),
    (dict(prompts=["Paris", 3]), r"prompts\[1\] must be a string, got int"),
])
def test_generate_batched_rejects_bad_arguments(kwargs, match):
    model, tokenizer = load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2")
    settings = dict(prompts=["Paris"], max_new_tokens=2, batch_size=1)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_batched(model, tokenizer, **settings)


# --------------------------------------------------------------------------------------------------------------------
# task files in the paper's formats
# --------------------------------------------------------------------------------------------------------------------


def test_free_generation_scorer_against_one_prompt_at_a_time():
    """CounterFact and zsRE requests whose answers are partly the unedited model's own greedy words, so that both
    outcomes occur; the scorer against a per-prompt ``generate`` and the rules written out by hand."""
    model, tokenizer = load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2")
    model.eval()

    def greedy(prompt, n):
        return greedy_ids_one_at_a_time(model, tokenizer, prompt, n)

    def own_word(prompt):
        word = tokenizer.decode(greedy(prompt, 1)).strip()
        assert word, prompt
        return word

    prompts = ["The hometown of Alice Bruno is", "The home town of Alice Bruno is", "Dana Smith lives in",
               "The hometown of Emil is", "Where was Dana born? In", "Dana was born in the city of"]
    counterfact = EditRequest(prompt="The hometown of {} is", subject="Alice Bruno", target_new=own_word(prompts[0]),
                              target_true="Rome", paraphrase_prompts=[prompts[1], prompts[2]],
                              neighborhood_prompts=[prompts[3]])
    zsre = EditRequest(prompt="Where was {} born? In", subject="Dana", target_new="Paris",
                       paraphrase_prompts=[prompts[5]], neighborhood_prompts=[prompts[3], prompts[2]],
                       neighborhood_targets=[own_word(prompts[3]), "Oslo"])

    def rules(prompt, target):
        target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        new = greedy(prompt, len(target_ids) + 3)
        text = " ".join(tokenizer.decode(new, skip_special_tokens=True).casefold().split())
        return float(new[: len(target_ids)] == target_ids), float(target.casefold() in text)

    def case(request):
        local = request.neighborhood_targets or [request.target_true] * len(request.neighborhood_prompts)
        parts = {"": [rules(request.rendered_prompt, request.target_new)],
                 "generalization_": [rules(p, request.target_new) for p in request.paraphrase_prompts],
                 "locality_": [rules(p, t) for p, t in zip(request.neighborhood_prompts, local)]}
        out = {}
        for part, values in parts.items():
            out[f"{part}exact_match"] = sum(v[0] for v in values) / len(values)
            out[f"{part}contains"] = sum(v[1] for v in values) / len(values)
        return out

    scores = {"counterfact": FreeGenerationScore(), "zsre": FreeGenerationScore()}
    update_free_generation(scores["counterfact"], scores["zsre"], model, tokenizer, [zsre, counterfact], batch_size=2)
    for kind, request in (("counterfact", counterfact), ("zsre", zsre)):
        got = {key: float(value) for key, value in scores[kind].compute().items()}
        assert got == pytest.approx(case(request)), kind
    values = [v for request in (counterfact, zsre) for v in case(request).values()]
    assert 0.0 in values and 1.0 in values  # both outcomes occur: the comparison can fail
    # An explicit window of one token: a two-token hedge before the answer no longer counts.
    narrow = FreeGenerationScore()
    update_free_generation(narrow, FreeGenerationScore(), model, tokenizer, [counterfact], max_new_tokens=1)
    assert float(narrow.compute()["exact_match"]) == float(scores["counterfact"].compute()["exact_match"])
    with pytest.raises(ValueError, match="new_token_slack must be an int >= 0, got -1"):
        update_free_generation(narrow, narrow, model, tokenizer, [counterfact], new_token_slack=-1)


# --------------------------------------------------------------------------------------------------------------------
# checkpoint state, arguments
# --------------------------------------------------------------------------------------------------------------------
