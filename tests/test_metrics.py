"""Metrics: hand-worked values, independent reference computations, and cases that must not match."""

import math

import pytest
import torch

from prune_lightning.metrics import (
    CounterFactScore,
    ExactMatch,
    FreeGenerationScore,
    LabelAccuracy,
    NumberMatch,
    RougeMean,
    TokenAccuracyScore,
    ZsREScore,
    build_text_metric,
    continuation_ids,
    counterfact_scores,
    exact_match,
    free_generation_scores,
    generation_contains,
    generation_exact_match,
    gsm8k_correct,
    label_accuracy,
    normalize_answer,
    normalize_generation,
    normalize_number,
    number_match,
    register_text_metric,
    rouge_mean,
    rouge_scores,
    span_exact_match,
    target_nll,
    teacher_forced_accuracy,
    teacher_forced_predictions,
    teacher_forced_scores,
)

# --------------------------------------------------------------------------------------------------------------------
# normalisation and exact match
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  A  cat,\tAN apple; the end. ", "cat apple end"),
        ("Wilhelm Conrad Röntgen!", "wilhelm conrad röntgen"),
        ("another theory", "another theory"),  # "an" inside a word is not an article
        ("rock-n-roll", "rocknroll"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_span_exact_match_hits_and_misses():
    assert span_exact_match("It was awarded to Wilhelm Röntgen.", ["Wilhelm Conrad Röntgen", "Röntgen"]) == 1.0
    assert span_exact_match("the answer is THE BEATLES!", "Beatles") == 1.0
    assert span_exact_match("May 18, 2018 was the date", "May 18 , 2018") == 1.0
    # must not match: a number inside a longer number, a word inside a word, a reversed span
    assert span_exact_match("In 1910 it rained", "1") == 0.0
    assert span_exact_match("the Parisian life", "Paris") == 0.0
    assert span_exact_match("Röntgen Wilhelm", "Wilhelm Röntgen") == 0.0
    # a reference that normalises to nothing never matches
    assert span_exact_match("the cat", ["The", "a"]) == 0.0


def test_exact_match_modes():
    preds = ["Paris, of course", "paris", "Lyon"]
    refs = [["Paris"], "Paris", ["Marseille", "Nice"]]
    assert float(exact_match(preds, refs)) == pytest.approx(2 / 3)
    assert float(exact_match(preds, refs, mode="exact")) == pytest.approx(1 / 3)
    assert math.isnan(float(exact_match([], [])))
    with pytest.raises(ValueError, match="mode must be one of .* got 'fuzzy'"):
        exact_match(preds, refs, mode="fuzzy")
    with pytest.raises(ValueError, match="mode must be one of"):
        ExactMatch(mode="fuzzy")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="not a single string"):
        exact_match("abc", ["abc"])


@pytest.mark.parametrize("mode", ["span", "exact"])
def test_exact_match_metric_halves_equal_one_update(mode):
    preds = ["Paris, of course", "paris", "Lyon", "the Beatles", "Beatles fan"]
    refs = [["Paris"], "Paris", "Nice", "Beatles", "The Beatles"]
    whole, halves = ExactMatch(mode=mode), ExactMatch(mode=mode)
    whole.update(preds, refs)
    halves.update(preds[:2], refs[:2])
    halves.update(preds[2:], refs[2:])
    assert float(whole.compute()) == pytest.approx(float(halves.compute()))
    assert float(whole.compute()) == pytest.approx(float(exact_match(preds, refs, mode=mode)))


# --------------------------------------------------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------------------------------------------------


def test_rouge_mean_hand_worked():
    # unigrams: {the, cat, sat} vs {the, cat, ran}: 2 shared -> P = R = F1 = 2/3
    # bigrams: {the cat, cat sat} vs {the cat, cat ran}: 1 shared -> F2 = 1/2; LCS "the cat" -> FL = 2/3
    value = float(rouge_mean(["the cat sat"], ["the cat ran"]))
    assert value == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3, abs=1e-6)
    # must not score: nothing shared
    assert float(rouge_mean(["dogs bark"], ["the cat ran"])) == 0.0


def test_rouge1_hand_worked_f_measure():
    from torchmetrics.functional.text import rouge_score

    # "a b c d" vs "a b e": 2 shared unigrams, P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7
    scores = rouge_score("a b c d", "a b e", rouge_keys=("rouge1",))
    assert float(scores["rouge1_fmeasure"]) == pytest.approx(4 / 7, abs=1e-6)


def test_rouge_mean_matches_torchmetrics_rougescore():
    from torchmetrics.text import ROUGEScore

    preds = ["the cat sat on the mat", "hello there general kenobi", "A will go to the shelter tomorrow."]
    refs = ["the cat is on the mat", ["hi there", "hello there, general"], "A will get a puppy at the shelter."]
    reference = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
    reference.update(preds, [[r] if isinstance(r, str) else r for r in refs])
    out = reference.compute()
    expected = (out["rouge1_fmeasure"] + out["rouge2_fmeasure"] + out["rougeL_fmeasure"]) / 3
    assert float(rouge_mean(preds, refs)) == pytest.approx(float(expected), abs=1e-6)
    assert rouge_scores(preds, refs).shape == (3,)

    whole, halves = RougeMean(), RougeMean()
    whole.update(preds, refs)
    halves.update(preds[:1], refs[:1])
    halves.update(preds[1:], refs[1:])
    assert float(whole.compute()) == pytest.approx(float(expected), abs=1e-6)
    assert float(halves.compute()) == pytest.approx(float(expected), abs=1e-6)


def test_rouge_mean_metric_reset_and_empty():
    metric = RougeMean()
    with pytest.warns(UserWarning, match="before the ``update`` method"):
        assert math.isnan(float(metric.compute()))
    metric.update(["the cat"], ["the cat"])
    assert float(metric.compute()) == pytest.approx(1.0)
    metric.reset()
    metric.update(["dog"], ["the cat"])
    assert float(metric.compute()) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# GSM8K numbers, labels, metrics by name
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("18", "18"), ("$1,000.00", "1000"), ("18.0", "18"), ("0.50", "0.5"), ("-7", "-7"), ("007", "7"),
     ("18.", "18"), ("-0", "0"), ("twelve", None), ("1.2.3", None), ("", None)],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_gsm8k_correct_hits_and_misses():
    assert gsm8k_correct(" 18.", "18")
    assert gsm8k_correct(" $1,800 in total", "1800")
    assert gsm8k_correct("18.0 dollars", "18")
    assert gsm8k_correct("first 3, then 70,000", "70000")
    assert gsm8k_correct(" -5 degrees", "-5")
    # must not match: a longer number, a negative, a decimal, no number at all
    assert not gsm8k_correct(" 180 eggs", "18")
    assert not gsm8k_correct(" -18", "18")
    assert not gsm8k_correct(" 1.8", "18")
    assert not gsm8k_correct(" eighteen", "18")
    with pytest.raises(ValueError, match="gold_number must be a number, got 'eighteen'"):
        gsm8k_correct("18", "eighteen")


def test_number_match_metric():
    preds, refs = [" 18.", " 7 eggs", " $3", "none"], ["18", "8", "3", "1"]
    assert float(number_match(preds, refs)) == pytest.approx(0.5)
    metric = NumberMatch()
    metric.update(preds[:3], refs[:3])
    metric.update(preds[3:], refs[3:])
    assert float(metric.compute()) == pytest.approx(0.5)


def test_label_accuracy():
    preds = ["entailment", " Not_Entailment ", "invalid", "entailment"]
    refs = ["entailment", "not_entailment", "not_entailment", "not_entailment"]
    assert float(label_accuracy(preds, refs)) == pytest.approx(0.5)
    assert float(label_accuracy(preds, refs, ignore_case=False)) == pytest.approx(0.25)
    metric = LabelAccuracy()
    metric.update(preds[:1], refs[:1])
    metric.update(preds[1:], refs[1:])
    assert float(metric.compute()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="ignore_case must be a bool, got 'yes'"):
        LabelAccuracy(ignore_case="yes")


def test_build_text_metric_by_name():
    assert isinstance(build_text_metric("rouge_mean"), RougeMean)
    assert build_text_metric("exact_match").mode == "exact"
    assert build_text_metric("span_exact_match").mode == "span"
    with pytest.raises(ValueError, match="unknown text metric 'bleu'; known: .*rouge_mean"):
        build_text_metric("bleu")
    with pytest.raises(ValueError, match="already registered"):
        register_text_metric("rouge_mean", RougeMean)


# --------------------------------------------------------------------------------------------------------------------
# CounterFact and zsRE scores from given values
# --------------------------------------------------------------------------------------------------------------------


def _cf_inputs():
    # three cases; NLLs of the new and the true object
    new = {
        "efficacy": torch.tensor([0.5, 3.0, 1.0]),
        "paraphrase": [torch.tensor([0.5, 2.0]), torch.tensor([1.0]), torch.tensor([])],
        "neighborhood": [torch.tensor([3.0, 0.1, 2.0]), torch.tensor([2.0]), torch.tensor([4.0, 4.0])],
    }
    true = {
        "efficacy": torch.tensor([2.0, 1.0, 2.0]),
        "paraphrase": [torch.tensor([1.0, 1.0]), torch.tensor([1.5]), torch.tensor([])],
        "neighborhood": [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0]), torch.tensor([1.0, 5.0])],
    }
    return new, true


def test_counterfact_scores_hand_worked():
    new, true = _cf_inputs()
    s = counterfact_scores(new, true)
    assert float(s["efficacy"]) == pytest.approx(2 / 3)  # cases 0 and 2: new beats true; case 1 does not
    assert float(s["generalization"]) == pytest.approx((0.5 + 1.0) / 2)  # case 2 has no paraphrase: not counted
    assert float(s["locality"]) == pytest.approx((2 / 3 + 1.0 + 0.5) / 3)  # true beats new, per case
    e = math.exp
    assert float(s["efficacy_margin"]) == pytest.approx(
        ((e(-0.5) - e(-2.0)) + (e(-3.0) - e(-1.0)) + (e(-1.0) - e(-2.0))) / 3, abs=1e-6
    )
    loc0 = ((e(-1.0) - e(-3.0)) + (e(-1.0) - e(-0.1)) + (e(-1.0) - e(-2.0))) / 3
    loc2 = ((e(-1.0) - e(-4.0)) + (e(-5.0) - e(-4.0))) / 2
    assert float(s["locality_margin"]) == pytest.approx((loc0 + (e(-1.0) - e(-2.0)) + loc2) / 3, abs=1e-6)


def test_counterfact_locality_is_not_efficacy():
    # must fail locality: the edit leaked, the neighbour now prefers the new object
    s = counterfact_scores({"efficacy": 0.1, "neighborhood": [[0.1]]}, {"efficacy": 2.0, "neighborhood": [[2.0]]})
    assert float(s["efficacy"]) == 1.0 and float(s["locality"]) == 0.0
    assert float(s["locality_margin"]) < 0
    assert math.isnan(float(s["generalization"]))


def test_counterfact_score_metric_matches_functional_and_halves():
    new, true = _cf_inputs()
    expected = counterfact_scores(new, true)

    def args(sl):
        out = {}
        for part in ("efficacy", "paraphrase", "neighborhood"):
            n, t = new[part], true[part]
            out[f"{part}_nll_new"] = n[sl]
            out[f"{part}_nll_true"] = t[sl]
        return out

    whole, halves = CounterFactScore(), CounterFactScore()
    whole.update(**args(slice(None)))
    halves.update(**args(slice(0, 1)))
    halves.update(**args(slice(1, None)))
    for metric in (whole, halves):
        got = metric.compute()
        assert set(got) == set(expected)
        for key in expected:
            assert float(got[key]) == pytest.approx(float(expected[key]), abs=1e-6), key


def test_counterfact_input_errors():
    with pytest.raises(ValueError, match="efficacy_nll_new has 2 cases but efficacy_nll_true has 1"):
        counterfact_scores({"efficacy": torch.tensor([1.0, 2.0])}, {"efficacy": torch.tensor([1.0])})
    with pytest.raises(ValueError, match="paraphrase values hold 1 cases but efficacy values hold 2"):
        CounterFactScore().update(
            torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), [torch.tensor([1.0])], [torch.tensor([1.0])]
        )
    with pytest.raises(ValueError, match="give both neighborhood_nll_new and neighborhood_nll_true"):
        CounterFactScore().update(1.0, 2.0, neighborhood_nll_new=[[1.0]])
    with pytest.raises(ValueError, match=r"unknown CounterFact prompt kind\(s\) \['rewrite'\]"):
        counterfact_scores({"rewrite": 1.0}, {"rewrite": 1.0})


def test_zsre_score_halves_and_errors():
    eff = torch.tensor([1.0, 0.5, 0.0, 1.0])
    gen = [torch.tensor([1.0, 0.0]), torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.25])]
    loc = torch.tensor([1.0, 1.0, 0.5, 0.5])
    whole, halves = ZsREScore(), ZsREScore()
    whole.update(eff, gen, loc)
    halves.update(eff[:2], gen[:2], loc[:2])
    halves.update(efficacy=eff[2:], generalization=gen[2:], locality=loc[2:])
    for metric in (whole, halves):
        out = metric.compute()
        assert float(out["efficacy"]) == pytest.approx(0.625)
        assert float(out["generalization"]) == pytest.approx((0.5 + 0.5 + 1.0 + 0.25) / 4)
        assert float(out["locality"]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"efficacy values must lie in \[0, 1\]"):
        ZsREScore().update(efficacy=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="must be 0-, 1- or 2-dimensional"):
        ZsREScore().update(efficacy=torch.zeros(2, 2, 2))


# --------------------------------------------------------------------------------------------------------------------
# teacher forcing on tiny models
# --------------------------------------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Michael Jordan plays", "The mother tongue of Danielle Darrieux is"]
TARGETS = ["Paris", "the guitar in Seattle", "French"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm(request):
    from prune_lightning.models import load_causal_lm, load_tokenizer

    spec = f"tiny:{request.param}"
    return load_causal_lm(spec), load_tokenizer(spec)


def _manual(model, tokenizer, prompt, target):
    """One unpadded forward pass per example: per-token log-probs of the target, and the argmaxes."""
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + t])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_lp = torch.stack([logp[len(p) - 1 + k, tok] for k, tok in enumerate(t)])
    argmax = torch.stack([logp[len(p) - 1 + k].argmax() for k in range(len(t))])
    return token_lp, argmax, torch.tensor(t)


def test_target_nll_matches_manual_per_token(tiny_lm):
    model, tokenizer = tiny_lm
    got = target_nll(model, tokenizer, PROMPTS, TARGETS, batch_size=2)  # padded batches of unequal lengths
    expected = torch.stack([-_manual(model, tokenizer, p, t)[0].mean() for p, t in zip(PROMPTS, TARGETS)])
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target_nll(model, tokenizer, PROMPTS, TARGETS, batch_size=1), got, atol=1e-5, rtol=1e-5)
    # must differ: the sum instead of the mean over tokens (target 1 has several tokens), and another target
    total = -_manual(model, tokenizer, PROMPTS[1], TARGETS[1])[0].sum()
    assert not torch.isclose(got[1], total)
    other = target_nll(model, tokenizer, PROMPTS[:1], ["Rome"])
    assert not torch.isclose(other[0], got[0])


def test_target_nll_keeps_training_mode_and_checks_inputs(tiny_lm):
    model, tokenizer = tiny_lm
    model.train()
    try:
        a = target_nll(model, tokenizer, PROMPTS, TARGETS)
        b = target_nll(model, tokenizer, PROMPTS, TARGETS)
        torch.testing.assert_close(a, b)  # eval mode inside: no dropout noise
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="got 2 prompts but 1 targets"):
        target_nll(model, tokenizer, PROMPTS[:2], TARGETS[:1])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        target_nll(model, tokenizer, PROMPTS, TARGETS, batch_size=0)
    with pytest.raises(ValueError, match="target must be a non-empty string"):
        target_nll(model, tokenizer, PROMPTS[:1], [" "])


def test_teacher_forced_accuracy_matches_manual(tiny_lm):
    model, tokenizer = tiny_lm
    acc = teacher_forced_accuracy(model, tokenizer, PROMPTS, TARGETS, batch_size=2)
    preds = teacher_forced_predictions(model, tokenizer, PROMPTS, TARGETS, batch_size=2)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        _, argmax, ids = _manual(model, tokenizer, p, t)
        assert torch.equal(preds[i], argmax)
        assert float(acc[i]) == pytest.approx(float((argmax == ids).float().mean()))
    # against the model's own predictions everything agrees; against shifted ones it must not
    same = teacher_forced_accuracy(model, tokenizer, PROMPTS, TARGETS, reference=preds)
    assert torch.equal(same, torch.ones(3))
    shifted = [(x + 1) % len(tokenizer) for x in preds]
    assert torch.equal(teacher_forced_accuracy(model, tokenizer, PROMPTS, TARGETS, reference=shifted), torch.zeros(3))
    with pytest.raises(ValueError, match=r"reference\[0\] has 99 tokens"):
        teacher_forced_accuracy(model, tokenizer, PROMPTS, TARGETS, reference=[torch.zeros(99)] * 3)


def test_teacher_forced_scores_are_nll_and_top1_of_one_pass(tiny_lm):
    model, tokenizer = tiny_lm
    nll, accuracy = teacher_forced_scores(model, tokenizer, PROMPTS, TARGETS, batch_size=2)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        token_lp, argmax, ids = _manual(model, tokenizer, p, t)
        assert float(nll[i]) == pytest.approx(float(-token_lp.mean()), abs=1e-5)
        assert float(accuracy[i]) == pytest.approx(float((argmax == ids).float().mean()))
    # the target "the guitar in Seattle" has several tokens: a fraction, not all-or-nothing, is possible
    assert len(continuation_ids(tokenizer, TARGETS[1], PROMPTS[1])) > 1
    empty = teacher_forced_scores(model, tokenizer, [], [])
    assert [v.shape for v in empty] == [(0,), (0,)]


def test_token_accuracy_score_means_cases_then_prompts():
    metric = TokenAccuracyScore()
    metric.update(efficacy=torch.tensor([1.0, 0.5]), generalization=[[1.0, 0.0], [0.5]])
    metric.update(locality=[[], [1.0, 1.0, 0.0]])  # a case without neighbours does not count
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"efficacy": 0.75, "generalization": 0.5, "locality": 2 / 3})
    with pytest.raises(ValueError, match=r"TokenAccuracyScore: unknown part\(s\) \['rewrite'\]"):
        super(TokenAccuracyScore, metric).update(rewrite=[1.0])
    with pytest.raises(ValueError, match=r"locality values must lie in \[0, 1\], got \[2.0\]"):
        metric.update(locality=[2.0])


# --------------------------------------------------------------------------------------------------------------------
# free generation: scores of hand-made generations
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("  Paris\n", "paris"), ("New   York\tCity", "new york city"), ("STRASSE", "strasse"), ("Straße", "strasse"),
    ("", ""),
])
def test_normalize_generation(text, expected):
    assert normalize_generation(text) == expected


def test_free_generation_scores_of_hand_made_generations():
    """Continuations of "The hometown of X is" written by hand in the tiny GPT-2 vocabulary, target "Paris"."""
    from prune_lightning.models import load_tokenizer

    tokenizer = load_tokenizer("tiny:gpt2")
    prompt, target = "The hometown of Alice Bruno is", "Paris"
    target_ids = continuation_ids(tokenizer, target, prompt)
    assert tokenizer.convert_ids_to_tokens(target_ids) == ["ĠParis"]  # one token

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    split = ids(" Pa") + ids("ris")  # the same text in other pieces
    assert tokenizer.decode(split) == " Paris" and len(split) > 1
    generations = {
        "exact": target_ids,
        "longer": target_ids + ids(", France"),
        "case": ids(" paris"),
        "split": split,
        "empty": [],
        "stopped_early": split[:1],  # " Pa", then end of sequence
        "hedge": ids(" the city of Paris"),
        "other": ids(" Rome"),
    }
    texts = [tokenizer.decode(g) for g in generations.values()]
    scores = free_generation_scores(list(generations.values()), texts, [target_ids] * len(generations),
                                    [target] * len(generations))
    got = {name: (int(e), int(c)) for name, e, c in zip(generations, scores["exact_match"], scores["contains"])}
    assert got == {
        "exact": (1, 1),
        "longer": (1, 1),  # only the target's length is compared
        "case": (0, 1),  # other tokens; the normalised text contains it
        "split": (0, 1),  # exact match compares tokens, not text
        "empty": (0, 0),
        "stopped_early": (0, 0),
        "hedge": (0, 1),  # not at the start; inside the window
        "other": (0, 0),
    }


def test_free_generation_rules_at_their_edges():
    # A continuation that extends the target's last token into a longer word matches both rules: the documented
    # consequence of comparing the first len(target) tokens and of a substring test.
    from prune_lightning.models import load_tokenizer

    tokenizer = load_tokenizer("tiny:gpt2")
    rome = continuation_ids(tokenizer, "Rome", "He lives in")
    romeo = tokenizer(" Romeo", add_special_tokens=False)["input_ids"]
    assert romeo[: len(rome)] == rome
    assert generation_exact_match(romeo, rome) and generation_contains(" Romeo", "Rome")
    # A multi-token target: every token must match; whitespace inside the target is normalised.
    assert generation_exact_match([5, 6, 7], [5, 6]) and not generation_exact_match([5, 7, 6], [5, 6])
    assert generation_contains(" new  york\ncity!", "New York City")
    assert not generation_contains(" NewYork City", "New York City")
    with pytest.raises(ValueError, match="target_ids is empty"):
        generation_exact_match([1], [])
    with pytest.raises(ValueError, match="target '  ' is empty after normalising"):
        generation_contains("anything", "  ")
    with pytest.raises(ValueError, match=r"one entry per prompt .* 'targets': 1"):
        free_generation_scores([[1], [2]], ["a", "b"], [[1], [2]], ["a"])


def test_free_generation_score_accumulates_per_case():
    whole, halves = FreeGenerationScore(), FreeGenerationScore()
    values = dict(exact_match=torch.tensor([1.0, 0.0, 1.0]), contains=torch.tensor([1.0, 1.0, 1.0]),
                  generalization_exact_match=[[1.0, 0.0], [0.0], []], locality_contains=[[1.0, 1.0], [0.0], [1.0]])
    whole.update(**values)
    halves.update(**{k: v[:1] for k, v in values.items()})
    halves.update(**{k: v[1:] for k, v in values.items()})
    for metric in (whole, halves):
        out = {k: float(v) for k, v in metric.compute().items()}
        assert out["exact_match"] == pytest.approx(2 / 3) and out["contains"] == 1.0
        assert out["generalization_exact_match"] == pytest.approx(0.25)  # (0.5 + 0) / 2: the empty case not counted
        assert out["locality_contains"] == pytest.approx(2 / 3)
        assert math.isnan(out["generalization_contains"]) and math.isnan(out["locality_exact_match"])


def test_continuation_ids_drops_sentencepiece_space():
    """A LLaMA-like tokenizer turns " Paris" into "▁" + "▁Paris"; after a prompt the model writes "▁Paris"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "▁": 2}
    for word in ["The", "capital", "of", "France", "is", "Paris"]:
        vocab["▁" + word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<unk>")
    assert tokenizer(" Paris", add_special_tokens=False)["input_ids"] == [2, vocab["▁Paris"]]
    assert continuation_ids(tokenizer, "Paris") == [vocab["▁Paris"]]
    joint = tokenizer("The capital of France is Paris", add_special_tokens=False)["input_ids"]
    assert joint[-1:] == continuation_ids(tokenizer, "Paris")


def test_continuation_ids_byte_level_unchanged(tiny_lm):
    _, tokenizer = tiny_lm
    assert continuation_ids(tokenizer, "Paris") == tokenizer(" Paris", add_special_tokens=False)["input_ids"]
