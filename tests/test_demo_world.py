"""The demo's fact world, its CounterFact requests and task files, and the cached tiny model trained on it."""

import json
import re

import pytest
import torch

from prune_lightning.data import read_counterfact
from prune_lightning.data.tasks import get_task, load_task
from prune_lightning.demo import DemoTrainingConfig, World, demo_checkpoint, fact_accuracy, rewrite_accuracy
from prune_lightning.demo import train as demo_train
from prune_lightning.demo.world import RELATIONS

# A model small enough to fit in a second or two; the real settings are DemoTrainingConfig's defaults.
MICRO = DemoTrainingConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=320, n_positions=48, steps=3, batch_size=8,
                           warmup_steps=1)


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(seed=0, n_entities=60)


def _small_world(seed: int = 0) -> World:
    return World.generate(seed=seed, n_entities=20, max_operand=4, n_entailment=16, n_copy=16)


def _subject_of(prompt: str, relation) -> str:
    """The subject of a prompt written in one of the relation's templates (fails if none matches)."""
    for template in relation.templates:
        pattern = "^" + re.escape(template).replace(re.escape("{}"), "(.+)") + "$"
        match = re.match(pattern, prompt)
        if match:
            return match.group(1)
    raise AssertionError(f"{prompt!r} is not in any phrasing of {relation.relation_id}")


# --------------------------------------------------------------------------------------------------------------------
# the world
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = World.generate(seed=7, n_entities=80), World.generate(seed=7, n_entities=80), World.generate(8, 80)
    assert a.facts() == b.facts()
    assert a.training_texts() == b.training_texts()
    assert a.counterfact_records(20, seed=1) == b.counterfact_records(20, seed=1)
    assert a.task_records(10) == b.task_records(10)
    assert a.entities != c.entities
    assert a.facts() != c.facts()
    assert a.counterfact_records(20) != a.counterfact_records(20, seed=1)


def test_facts_are_consistent(world):
    facts = world.facts()
    assert len(world.entities) == len(set(world.entities)) == 60
    assert len(facts) == 60 * len(RELATIONS)
    # one object per (subject, relation): no contradictions
    assert len({(f.subject, f.relation_id) for f in facts}) == len(facts)
    for fact in facts:
        rel = world.relation(fact.relation_id)
        assert fact.object in rel.objects
        for t, template in enumerate(rel.templates):
            # every phrasing ends right before the object
            assert world.fact_text(fact, t) == f"{template.format(fact.subject)} {fact.object}."
    # objects are dealt out evenly: counts differ by at most one
    for rel in world.relations:
        counts = [sum(f.object == o for f in facts if f.relation_id == rel.relation_id) for o in rel.objects]
        assert max(counts) - min(counts) <= 1
    names = " ".join(world.entities)
    assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+( [A-Z][a-z]+ [A-Z][a-z]+)*", names)


def test_training_texts_hold_facts_and_general_material(world):
    texts = world.training_texts()
    assert len(texts) == len(world.facts()) * 3 + 3 * len(world.general_texts())
    assert "8 + 7 = 15" in texts
    assert any(t.startswith("Repeat: ") and t.split(" => ")[0][8:] == t.split(" => ")[1] for t in texts)
    assert any(t.endswith("True or False? True") for t in texts)
    assert any(t.endswith("True or False? False") for t in texts)


def test_counterfact_records(world, tmp_path):
    records = world.counterfact_records(40, seed=2)
    edited = {r["requested_rewrite"]["subject"] for r in records}
    assert len(edited) == 40  # distinct subjects while there are enough
    for record in records:
        rewrite = record["requested_rewrite"]
        rel = world.relation(rewrite["relation_id"])
        subject, true, new = rewrite["subject"], rewrite["target_true"]["str"], rewrite["target_new"]["str"]
        assert rewrite["prompt"] == rel.templates[0]
        assert true == world.objects[(subject, rel.relation_id)]
        assert new != true and new in rel.objects
        assert [_subject_of(p, rel) for p in record["paraphrase_prompts"]] == [subject, subject]
        assert set(record["paraphrase_prompts"]) == {t.format(subject) for t in rel.templates[1:]}
        neighbors = [_subject_of(p, rel) for p in record["neighborhood_prompts"]]  # same relation
        assert 1 <= len(neighbors) <= 10 and len(set(neighbors)) == len(neighbors)
        assert subject not in neighbors and all(subject not in p for p in record["neighborhood_prompts"])
        # CounterFact's neighbours: other subjects that share the true object, never edited in this relation
        assert all(world.objects[(n, rel.relation_id)] == true for n in neighbors)
        assert not any(
            n == r["requested_rewrite"]["subject"] and rel.relation_id == r["requested_rewrite"]["relation_id"]
            for n in neighbors for r in records
        )
        assert all(world.objects[(_subject_of(p, rel), rel.relation_id)] == new for p in record["attribute_prompts"])
        # subjects that no request edits come first
        flags = [n in edited for n in neighbors]
        assert flags == sorted(flags)

    path = world.write_counterfact(tmp_path / "requests.json", 40, seed=2)
    assert json.loads(path.read_text()) == records
    assert not list(tmp_path.glob(".*tmp*"))
    requests = read_counterfact(path)
    assert len(requests) == 40
    first = requests[0]
    assert first.subject == records[0]["requested_rewrite"]["subject"]
    assert first.prompt == records[0]["requested_rewrite"]["prompt"]
    assert first.target_new == records[0]["requested_rewrite"]["target_new"]["str"]
    assert list(first.neighborhood_prompts) == records[0]["neighborhood_prompts"]


def test_more_requests_than_subjects_cover_other_relations():
    small = _small_world()
    records = small.counterfact_records(50)
    pairs = [(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in records]
    assert len(set(pairs)) == 50
    assert all(r["neighborhood_prompts"] for r in records)
    with pytest.raises(ValueError, match="n_requests"):
        small.counterfact_records(20 * len(RELATIONS) + 1)


def test_generate_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_entities"):
        World.generate(n_entities=0)
    bad = RELATIONS[0].__class__("P1", "x", ("{} lives in ",), ("a", "b"))
    with pytest.raises(ValueError, match="end right before"):
        World.generate(relations=[bad])


# --------------------------------------------------------------------------------------------------------------------
# task files
# --------------------------------------------------------------------------------------------------------------------


def test_task_files_load_with_load_task(world, tmp_path):
    paths = world.write_tasks(tmp_path / "tasks", n_per_task=25, n_requests=30)
    assert sorted(paths) == ["demo-arithmetic", "demo-copy", "demo-entailment", "demo-facts"]

    arithmetic = load_task("demo-arithmetic", str(tmp_path / "tasks" / "arithmetic.jsonl"), limit=0)
    assert len(arithmetic) == 25
    for ex in arithmetic:
        a, b = re.fullmatch(r"(\d+) \+ (\d+) =", ex.prompt).groups()
        assert ex.references == (str(int(a) + int(b)),)
    spec = get_task("demo-arithmetic")
    assert spec.prediction(" 19\n3 + 4 = 7") == "19"
    metric = spec.make_metric()
    metric.update([" " + ex.references[0] for ex in arithmetic], [ex.references for ex in arithmetic])
    assert float(metric.compute()) == 1.0

    entailment = load_task("demo-entailment", paths["demo-entailment"], limit=0)
    assert {ex.references[0] for ex in entailment} <= {"entailment", "not_entailment"}
    assert all(ex.prompt.endswith(" True or False?") and " Claim: " in ex.prompt for ex in entailment)
    spec = get_task("demo-entailment")
    predictions = [spec.prediction(" True" if ex.references[0] == "entailment" else " False") for ex in entailment]
    metric = spec.make_metric()
    metric.update(predictions, [ex.references for ex in entailment])
    assert float(metric.compute()) == 1.0

    copy = load_task("demo-copy", paths["demo-copy"], limit=0)
    for ex in copy:
        assert ex.prompt == f"Repeat: {ex.references[0]} =>"
    assert get_task("demo-copy").prediction(" sun cat\nRepeat: x") == "sun cat"

    facts = load_task("demo-facts", paths["demo-facts"], limit=0)
    edited = {fact.subject for fact, _ in world.requested_facts(30)}
    assert len(facts) == 25
    for ex in facts:
        assert ex.meta["subject"] not in edited
        rel = next(r for r in world.relations if any(_matches(ex.prompt, t) for t in r.templates[:1]))
        assert ex.references == (world.objects[(ex.meta["subject"], rel.relation_id)],)


def _matches(prompt: str, template: str) -> bool:
    return re.fullmatch(re.escape(template).replace(re.escape("{}"), ".+"), prompt) is not None


# --------------------------------------------------------------------------------------------------------------------
# the trained model
# --------------------------------------------------------------------------------------------------------------------


def test_demo_checkpoint_is_cached(tmp_path, monkeypatch):
    from prune_lightning.models import load_causal_lm, load_tokenizer

    path = demo_checkpoint(seed=0, cache_dir=tmp_path, n_entities=20, config=MICRO, progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "world.json", "training.json", "corpus.txt"):
        assert (path / name).exists(), name
    assert not list(tmp_path.glob(".*tmp*"))
    assert json.loads((path / "training.json").read_text())["config"]["steps"] == 3
    assert World.from_settings(json.loads((path / "world.json").read_text())).facts() == World.generate(0, 20).facts()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(demo_train, "train_demo_model", no_training)
    assert demo_checkpoint(seed=0, cache_dir=tmp_path, n_entities=20, config=MICRO, progress=False) == path
    # other settings, other directory
    other = demo_train.demo_checkpoint_path(seed=0, cache_dir=tmp_path, n_entities=20, config=MICRO, steps=4)
    assert other != path and other.parent == path.parent

    model, tokenizer = load_causal_lm(str(path)), load_tokenizer(str(path))
    assert model.config.n_layer == 1 and len(tokenizer) <= MICRO.vocab_size
    world = World.generate(0, 20)
    assert 0.0 <= fact_accuracy(model, tokenizer, world, n=30) <= 1.0
    records = world.counterfact_records(10)
    for part in ("prompt", "paraphrase", "neighborhood"):
        assert 0.0 <= rewrite_accuracy(model, tokenizer, records, part) <= 1.0
    sigmas = demo_train.mlp_out_sigma_max(model)
    assert list(sigmas) == ["transformer.h.0.mlp.c_proj.weight"] and sigmas["transformer.h.0.mlp.c_proj.weight"] > 0


def test_same_seed_same_weights():
    world = _small_world()
    first, _, _ = demo_train.train_demo_model(world, MICRO, seed=1, progress=False)
    second, _, _ = demo_train.train_demo_model(world, MICRO, seed=1, progress=False)
    third, _, _ = demo_train.train_demo_model(world, MICRO, seed=2, progress=False)
    a, b, c = first.state_dict(), second.state_dict(), third.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_config_is_checked():
    with pytest.raises(ValueError, match="divisible"):
        DemoTrainingConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="steps"):
        DemoTrainingConfig(steps=0)
