"""GeneralAbilityEvaluator and EditQualityEvaluator: inside ROME fits, a plain loop and the CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

from conftest import greedy_one_at_a_time, read_csv_metrics, target_nll, write_counterfact
from prune_lightning import EditDataModule, EditRequest, SequentialEditor
from prune_lightning.callbacks.edit_quality import TABLE_COLUMNS, TIMINGS, EditQualityEvaluator
from prune_lightning.callbacks.general_ability import GeneralAbilityEvaluator, TaskConfig
from prune_lightning.data.tasks import get_task, load_task
from prune_lightning.metrics.quality import EditQualityMetrics
from prune_lightning.models import load_causal_lm, load_tokenizer

# The scores logged per timing for CounterFact requests, by protocol: the contract of the dashboards.
TEACHER_FORCED_COUNTERFACT = ("probability_success", "probability_margin", "top1_accuracy", "generalization",
                              "generalization_margin", "generalization_top1_accuracy", "locality", "locality_margin",
                              "locality_top1_accuracy")
FREE_GENERATION = ("exact_match", "contains", "generalization_exact_match", "generalization_contains",
                   "locality_exact_match", "locality_contains")


def _write_gsm8k(path: Path, n: int) -> Path:
    lines = [json.dumps({"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
                         "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_rte(path: Path, n: int) -> Path:
    rows = ["index\tsentence1\tsentence2\tlabel"]
    for i in range(n):
        label = "entailment" if i % 2 else "not_entailment"
        rows.append(f"{i}\tThe Eiffel Tower is in Paris {i}.\tParis has a tower.\t{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _write_samsum_of_own_generations(path: Path, model, tokenizer, n: int) -> Path:
    """SAMSum records whose reference summary is the unedited model's own greedy continuation: ROUGE 1 at edit 0."""
    dialogues = [f"Anna: Are you in Paris {i}?\r\nBen: No, in Rome." for i in range(n)]
    spec = get_task("samsum")
    prompts = [spec.render({"dialogue": d, "id": str(i)}) for i, d in enumerate(dialogues)]
    summaries = greedy_one_at_a_time(model, tokenizer, prompts, spec.max_new_tokens)
    records = [{"id": str(i), "dialogue": d, "summary": s if s.strip() else "none"}
               for i, (d, s) in enumerate(zip(dialogues, summaries))]
    path.write_text(json.dumps(records))
    return path


class _TableLogger(Logger):
    """Records what a W&B-like logger would receive: metrics and tables."""

    def __init__(self):
        super().__init__()
        self.tables = []

    @property
    def name(self):
        return "tables"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append({"key": key, "columns": columns, "data": data})


# --------------------------------------------------------------------------------------------------------------------
# both evaluators inside a ROME fit
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_fit(tmp_path_factory, tiny_corpus):
    """Four ROME edits of tiny GPT-2 with both evaluators; general abilities every 3 edits, edit quality every 2."""
    from lightning.pytorch import Trainer

    from prune_lightning import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    root = tmp_path_factory.mktemp("evaluated-fit")
    reference_model, tokenizer = load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2")
    samsum = _write_samsum_of_own_generations(root / "test-summarization.json", reference_model, tokenizer, 3)
    tasks = [TaskConfig("gsm8k", str(_write_gsm8k(root / "test-reasoning.jsonl", 5)), limit=3),
             {"name": "rte", "source": str(_write_rte(root / "test-NLI.tsv", 4))},
             TaskConfig("samsum", str(samsum), limit=0)]
    general = GeneralAbilityEvaluator(tasks=tasks, every_n_edits=3, batch_size=2)
    quality = EditQualityEvaluator(every_n_edits=2, batch_size=4)
    tables = _TableLogger()
    editor = ROME(layer=1, v_num_grad_steps=20, v_lr=0.5, mom2_corpus=str(tiny_corpus), mom2_n_samples=200,
                  v_weight_decay=0.5, context_template_lengths=((5, 2),))  # conftest's rome_factory()
    module = SequentialEditor(model="tiny:gpt2", editor=editor, save_edited_model=False, verbose=False)
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": 1, "default_root_dir": root,
                         "logger": [CSVLogger(root, name="logs"), tables], "enable_progress_bar": False,
                         "enable_checkpointing": False, "callbacks": [general, quality]})
    trainer.fit(module, datamodule=EditDataModule(source=str(write_counterfact(root / "cf.json", 4))))
    return dict(trainer=trainer, module=module, general=general, quality=quality, tables=tables,
                reference_model=reference_model, tokenizer=tokenizer, tasks=tasks)


def _steps(rows, key):
    return sorted(int(r["step"]) for r in rows if r.get(key))


def _counterfact_names(timing):
    return {f"edit_quality/{timing}/teacher_forced/counterfact/{score}" for score in TEACHER_FORCED_COUNTERFACT} | \
        {f"edit_quality/{timing}/free_generation/counterfact/{score}" for score in FREE_GENERATION}


def test_evaluators_log_to_the_csv_logger_at_their_steps(evaluated_fit):
    rows = read_csv_metrics(evaluated_fit["trainer"])
    for key in ("general/gsm8k/number_match", "general/rte/label_accuracy", "general/samsum/rouge_mean"):
        assert _steps(rows, key) == [0, 3, 4]  # edit 0, every 3 edits, the end
    # Every timing, both protocols, CounterFact only (no zsRE request was edited): these names and no others.
    logged = {key for row in rows for key, value in row.items() if key.startswith("edit_quality") and value}
    assert logged == set().union(*(_counterfact_names(timing) for timing in TIMINGS))
    for timing, steps in [("before_own_edit", [2, 4]), ("after_own_edit", [2, 4]), ("retention", [2, 4]),
                          ("after_sequence", [4])]:  # every 2 edits; the end is step 4 again, logged once more
        for key in _counterfact_names(timing):
            assert _steps(rows, key) == steps, key
    history = evaluated_fit["quality"].history
    success = [(r["timing"], r["requests"]) for r in history if r["score"] == "probability_success"]
    assert success == [("before_own_edit", 2), ("after_own_edit", 2), ("retention", 2),
                       ("before_own_edit", 4), ("after_own_edit", 4), ("retention", 4), ("after_sequence", 4)]
    assert all(set(row) >= set(TABLE_COLUMNS) for row in history)


def test_general_scores_match_an_independent_evaluation_of_the_unedited_model(evaluated_fit):
    general, model, tokenizer = evaluated_fit["general"], evaluated_fit["reference_model"], evaluated_fit["tokenizer"]
    at_zero = {(h["task"], h["metric"]): h["value"] for h in general.history if h["step"] == 0}
    assert set(at_zero) == {("gsm8k", "number_match"), ("rte", "label_accuracy"), ("samsum", "rouge_mean")}
    for task in evaluated_fit["tasks"]:
        task = task if isinstance(task, TaskConfig) else TaskConfig(**task)
        spec = get_task(task.name)
        examples = load_task(task.name, task.source, limit=task.limit)
        generations = greedy_one_at_a_time(model, tokenizer, [e.prompt for e in examples], spec.max_new_tokens)
        metric = spec.make_metric()
        metric.update([spec.prediction(g) for g in generations], [list(e.references) for e in examples])
        assert at_zero[(task.name, spec.metric)] == pytest.approx(float(metric.compute()))
    assert at_zero[("samsum", "rouge_mean")] > 0.9  # the references are the unedited model's own continuations
    assert [h["step"] for h in general.history if h["task"] == "samsum"] == [0, 3, 4]
    # Each evaluator's table of score against edits went to the logger that takes tables, once, at the end.
    tables = {table["key"]: table for table in evaluated_fit["tables"].tables}
    assert len(tables) == len(evaluated_fit["tables"].tables) == 2
    table = tables["general_ability"]
    assert table["columns"] == ["step", "task", "metric", "value"]
    assert table["data"] == [[h["step"], h["task"], h["metric"], h["value"]] for h in general.history]
    assert len(table["data"]) == 9
    quality = evaluated_fit["quality"].history
    table = tables["edit_quality"]
    assert table["columns"] == ["step", "requests", "timing", "protocol", "kind", "score", "value"]
    assert table["data"] == [[h["step"], h["requests"], h["timing"], h["protocol"], h["kind"], h["score"], h["value"]]
                             for h in quality]
    assert {row[0] for row in table["data"]} == {2, 4} and len(table["data"]) == len(quality) > 0


def _value(history, step, timing, score, protocol="teacher_forced"):
    (row,) = [h for h in history if (h["step"], h["timing"], h["protocol"], h["score"]) ==
              (step, timing, protocol, score)]
    return row["value"]


def test_edit_quality_rises_over_the_before_own_edit_values(evaluated_fit):
    history = evaluated_fit["quality"].history
    for step in (2, 4):
        before = lambda score, protocol="teacher_forced": _value(history, step, "before_own_edit", score, protocol)
        after = lambda score, protocol="teacher_forced": _value(history, step, "after_own_edit", score, protocol)
        assert after("probability_margin") > before("probability_margin")
        assert after("probability_success") >= before("probability_success")
        assert after("exact_match", "free_generation") > before("exact_match", "free_generation")
    assert _value(history, 4, "after_sequence", "probability_success") == 1.0


def test_one_token_targets_exact_match_is_top1_accuracy(evaluated_fit):
    """For a one-token target, greedy generation's first token is the argmax that top-1 accuracy reads: the two
    protocols must agree at every timing, while the probability comparison may well say more."""
    history, tokenizer = evaluated_fit["quality"].history, evaluated_fit["tokenizer"]
    for request in evaluated_fit["quality"].requests:
        for prompt in (request.rendered_prompt, *request.paraphrase_prompts):
            assert len(tokenizer(prompt + " " + request.target_new)["input_ids"]) == \
                len(tokenizer(prompt)["input_ids"]) + 1
    pairs = [("exact_match", "top1_accuracy"), ("generalization_exact_match", "generalization_top1_accuracy")]
    for step, timing in [(2, "before_own_edit"), (2, "after_own_edit"), (2, "retention"), (4, "after_sequence")]:
        for free, forced in pairs:
            assert _value(history, step, timing, free, "free_generation") == \
                pytest.approx(_value(history, step, timing, forced)), (timing, free)


def test_retention_ends_on_the_after_sequence_score(evaluated_fit):
    history = evaluated_fit["quality"].history
    after_sequence = {(h["protocol"], h["kind"], h["score"]): h["value"] for h in history
                      if h["timing"] == "after_sequence"}
    assert len(after_sequence) == len(TEACHER_FORCED_COUNTERFACT) + len(FREE_GENERATION)
    last_retention = {}
    for h in history:  # in logging order: the last row of each score wins
        if h["timing"] == "retention":
            last_retention[(h["protocol"], h["kind"], h["score"])] = h["value"]
    assert last_retention == after_sequence
    # The end was evaluated at step 4 already (no post-hoc restraint): logged again, not recomputed.
    assert [h["step"] for h in history if h["timing"] == "retention" and h["score"] == "contains"] == [2, 4]


def test_scores_match_an_independent_computation_on_the_edited_model(evaluated_fit):
    """Probability success, top-1 accuracy, exact match and contains of the final model, written out by hand: one
    unpadded forward or ``generate`` per prompt."""
    model, tokenizer = evaluated_fit["module"].model, evaluated_fit["tokenizer"]
    requests = evaluated_fit["quality"].requests
    model.eval()

    def top1(prompt, target):
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + target_ids])).logits[0]
        argmax = logits[len(prompt_ids) - 1 : -1].argmax(dim=-1)
        return (argmax == torch.tensor(target_ids)).float().mean().item()

    def generated(prompt, target):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=len(target_ids) + 3, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        text = " ".join(tokenizer.decode(new, skip_special_tokens=True).lower().split())
        return float(new[: len(target_ids)] == target_ids), float(" ".join(target.lower().split()) in text)

    def mean(values):
        return sum(values) / len(values)

    expected = {
        "teacher_forced/probability_success": mean([
            float(target_nll(model, tokenizer, r.rendered_prompt, r.target_new) <
                  target_nll(model, tokenizer, r.rendered_prompt, r.target_true)) for r in requests]),
        "teacher_forced/top1_accuracy": mean([top1(r.rendered_prompt, r.target_new) for r in requests]),
        "teacher_forced/generalization_top1_accuracy": mean([
            mean([top1(p, r.target_new) for p in r.paraphrase_prompts]) for r in requests]),
        "teacher_forced/locality_top1_accuracy": mean([
            mean([top1(p, r.target_true) for p in r.neighborhood_prompts]) for r in requests]),
        "free_generation/exact_match": mean([generated(r.rendered_prompt, r.target_new)[0] for r in requests]),
        "free_generation/contains": mean([generated(r.rendered_prompt, r.target_new)[1] for r in requests]),
        "free_generation/generalization_contains": mean([
            mean([generated(p, r.target_new)[1] for p in r.paraphrase_prompts]) for r in requests]),
        "free_generation/locality_exact_match": mean([
            mean([generated(p, r.target_true)[0] for p in r.neighborhood_prompts]) for r in requests]),
    }
    history = evaluated_fit["quality"].history
    got = {f"{protocol}/{score}": _value(history, 4, "after_sequence", score, protocol)
           for protocol, score in (key.split("/") for key in expected)}
    assert got == pytest.approx(expected)
    assert 0 < expected["teacher_forced/top1_accuracy"] and 0 < expected["free_generation/exact_match"]


def test_test_step_logs_the_teacher_forced_scores_under_their_protocol(evaluated_fit, tmp_path):
    from lightning.pytorch import Trainer

    module = evaluated_fit["module"]
    data = EditDataModule(source=str(evaluated_fit["trainer"].default_root_dir) + "/cf.json")
    (logged,) = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path).test(module, datamodule=data, verbose=False)
    assert set(logged) == {f"test/teacher_forced/counterfact/{score}" for score in TEACHER_FORCED_COUNTERFACT}
    history = evaluated_fit["quality"].history
    for score in TEACHER_FORCED_COUNTERFACT:  # the same model and requests as the evaluator's after-sequence score
        assert logged[f"test/teacher_forced/counterfact/{score}"] == \
            pytest.approx(_value(history, 4, "after_sequence", score), abs=1e-6)


def test_own_edit_timings_score_each_request_right_before_and_after_its_write(tmp_path, rome_factory, make_trainer):
    requests_file = write_counterfact(tmp_path / "cf.json", 2, seed=3)
    quality = EditQualityEvaluator(every_n_edits=1)
    module = SequentialEditor(model="tiny:gpt2", editor=rome_factory(), save_edited_model=False, verbose=False)
    data = EditDataModule(source=str(requests_file))
    data.setup("fit")
    reference = EditQualityMetrics(free_generation=True)
    reference.update(load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2"), data.requests[:1])
    unedited = reference.compute()
    make_trainer([quality]).fit(module, datamodule=EditDataModule(source=str(requests_file)))

    def at(step, timing):
        return {f"{h['protocol']}/{h['kind']}/{h['score']}": h["value"] for h in quality.history
                if h["step"] == step and h["timing"] == timing}

    assert at(1, "before_own_edit") == pytest.approx(unedited)  # the first request on the unedited model
    # After the first write, its own-edit score is the retention score: the same request on the same model.
    assert at(1, "after_own_edit") == pytest.approx(at(1, "retention"))
    assert at(1, "after_own_edit")["teacher_forced/counterfact/probability_margin"] > \
        at(1, "before_own_edit")["teacher_forced/counterfact/probability_margin"]
    assert sorted({h["step"] for h in quality.history}) == [1, 2]


def test_post_hoc_restraint_adds_the_last_retention_point(tmp_path, rome_factory, make_trainer):
    from prune_lightning.callbacks import PRUNECallback

    quality = EditQualityEvaluator(every_n_edits=2)
    module = SequentialEditor(model="tiny:gpt2", editor=rome_factory(), save_edited_model=False, verbose=False)
    trainer = make_trainer([quality, PRUNECallback(alpha=1e4, mode="post_hoc")])
    trainer.fit(module, datamodule=EditDataModule(source=str(write_counterfact(tmp_path / "cf.json", 2))))
    history = quality.history

    retention, after_sequence = _evaluations(history, "retention"), _evaluations(history, "after_sequence")
    assert len(retention) == 2 and len(after_sequence) == 1  # step 2 twice: after the write, after the restraint
    assert retention[-1] == after_sequence[0]
    # The restraint changed the model: the end-of-fit point is not the step's first one, and it is the final model's.
    margin = ("teacher_forced", "probability_margin")
    assert retention[0][margin] != retention[1][margin]
    final = EditQualityMetrics(free_generation=True)
    final.update(module.model, module.tokenizer, quality.requests)
    assert {f"{p}/counterfact/{s}": v for (p, s), v in after_sequence[0].items()} == pytest.approx(final.compute())
    # The own-edit running means are not logged twice at step 2.
    for timing in ("before_own_edit", "after_own_edit"):
        assert len([h for h in history if h["timing"] == timing and h["score"] == "exact_match"]) == 1
    rows = read_csv_metrics(trainer)
    key = "edit_quality/retention/teacher_forced/counterfact/probability_margin"
    assert [float(r[key]) for r in rows if r.get(key)] == pytest.approx([b[margin] for b in retention])


def test_resume_from_a_checkpoint_keeps_the_running_means(tmp_path, rome_factory, make_trainer):
    from lightning.pytorch.callbacks import ModelCheckpoint

    source = str(write_counterfact(tmp_path / "cf.json", 4))

    def run(root, ckpt_path=None, checkpoint=True):
        quality = EditQualityEvaluator(every_n_edits=3)
        module = SequentialEditor(model="tiny:gpt2", editor=rome_factory(), save_edited_model=False, verbose=False)
        callbacks = [quality]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1,
                                             filename="{step}"))
        make_trainer(callbacks, root=root, enable_checkpointing=checkpoint).fit(
            module, datamodule=EditDataModule(source=source), ckpt_path=ckpt_path)
        return quality

    full = run(tmp_path / "full")
    # Resumed after 2 edits, before any evaluation: the step-3 means hold those 2 requests only through the checkpoint.
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "ckpt" / "step=2.ckpt", checkpoint=False)
    assert resumed.requests == full.requests
    assert [(h["step"], h["timing"], h["protocol"], h["score"]) for h in resumed.history] == \
        [(h["step"], h["timing"], h["protocol"], h["score"]) for h in full.history]
    assert [h["value"] for h in resumed.history] == pytest.approx([h["value"] for h in full.history], abs=1e-5)
    for timing in ("before_own_edit", "after_own_edit"):
        assert resumed._running[timing]["teacher_forced/counterfact"]["efficacy_cases"] == 4
        assert [h["requests"] for h in resumed.history if h["timing"] == timing and h["score"] == "contains"] == [3, 4]


def _evaluations(history, timing):
    """The rows of ``timing`` as one ``{(protocol, score): value}`` per evaluation (a score that comes again starts
    the next one)."""
    out = []
    for h in history:
        if h["timing"] != timing:
            continue
        key = (h["protocol"], h["score"])
        if not out or key in out[-1]:
            out.append({})
        out[-1][key] = h["value"]
    return out


def test_state_dict_round_trip_through_a_checkpoint(evaluated_fit, tmp_path):
    trainer, general, quality = evaluated_fit["trainer"], evaluated_fit["general"], evaluated_fit["quality"]
    assert general.state_key != quality.state_key
    path = tmp_path / "evaluators.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]  # plain data only: no pickled classes

    general2 = GeneralAbilityEvaluator(tasks=evaluated_fit["tasks"], every_n_edits=3, batch_size=2)
    quality2 = EditQualityEvaluator(every_n_edits=2, batch_size=4)
    assert general2.state_key == general.state_key and quality2.state_key == quality.state_key
    general2.load_state_dict(states[general.state_key])
    quality2.load_state_dict(states[quality.state_key])
    assert general2.history == general.history and general2.last_step == 4
    assert quality2.requests == quality.requests and len(quality2.requests) == 4
    assert all(isinstance(r, EditRequest) for r in quality2.requests)
    assert quality2.history == quality.history and quality2.last_step == 4
    assert quality2.state_dict() == quality.state_dict()
    assert quality2._running == quality._running
    for timing in ("before_own_edit", "after_own_edit"):
        assert quality2._running[timing]["teacher_forced/counterfact"]["efficacy_cases"] == 4
        assert quality2._running[timing]["free_generation/counterfact"]["exact_match_cases"] == 4


def test_a_checkpoint_of_the_old_evaluator_is_refused_with_one_clear_error():
    old = {"requests": [], "last_step": 2, "pre_states": {"counterfact": {"efficacy_sum": 1.0}},
           "history": [{"step": 2, "requests": 2, "kind": "counterfact", "score": "efficacy", "pre_edit": False,
                        "value": 1.0}]}
    with pytest.raises(ValueError, match="written before the evaluator logged timings and protocols"):
        EditQualityEvaluator().load_state_dict(old)


def test_zsre_requests_are_scored_under_their_kind():
    model, tokenizer = load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2")
    zsre = EditRequest(prompt="Where was {} born? In", subject="Dana", target_new="Paris",
                       paraphrase_prompts=["Dana was born in the city of"], neighborhood_prompts=["Emil lives in"],
                       neighborhood_targets=["Oslo"])
    metrics = EditQualityMetrics(free_generation=True)
    metrics.update(model, tokenizer, [zsre])
    values = metrics.compute()
    assert set(values) == {f"teacher_forced/zsre/{score}" for score in ("top1_accuracy", "generalization", "locality")} \
        | {f"free_generation/zsre/{score}" for score in FREE_GENERATION}
    assert all(0.0 <= value <= 1.0 for value in values.values())
    assert EditQualityMetrics().compute() == {}  # nothing scored: no kind is reported


def test_distinct_settings_give_distinct_state_keys():
    assert EditQualityEvaluator(every_n_edits=1).state_key != EditQualityEvaluator(every_n_edits=2).state_key
    a = GeneralAbilityEvaluator(tasks=[TaskConfig("gsm8k", "a.jsonl")])
    b = GeneralAbilityEvaluator(tasks=[TaskConfig("rte", "a.tsv")])
    assert a.state_key != b.state_key


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=[]), "tasks is empty"),
    (dict(tasks="gsm8k"), "tasks must be a list of task configs, got 'gsm8k'"),
    (dict(tasks=[{"name": "gsm8k"}]), r"tasks\[0\] .* needs a name and a source"),
    (dict(tasks=[{"name": "gsm8k", "source": "a", "split": "test"}]), r"unknown key\(s\) \['split'\]"),
    (dict(tasks=[TaskConfig("nope", "a.jsonl")]), "unknown task 'nope'"),
    (dict(tasks=[TaskConfig("gsm8k", "a.jsonl", limit=-5)]), r"limit must be .* got -5"),
    (dict(tasks=[TaskConfig("rte", "a.tsv"), TaskConfig("rte", "b.tsv")]), r"\['rte'\] listed more than once"),
    (dict(every_n_edits=0), "every_n_edits must be an int >= 1, got 0"),
    (dict(batch_size=-2), "batch_size must be an int >= 1, got -2"),
])
def test_general_ability_rejects_bad_arguments(kwargs, match):
    settings = dict(tasks=[TaskConfig("gsm8k", "a.jsonl")])
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GeneralAbilityEvaluator(**settings)


@pytest.mark.parametrize("kwargs, match", [
    (dict(every_n_edits=0), "every_n_edits must be an int >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(pre_edit="yes"), "pre_edit must be a bool, got 'yes'"),
    (dict(after_own_edit=1), "after_own_edit must be a bool, got 1"),
    (dict(retention=None), "retention must be a bool, got None"),
    (dict(free_generation="no"), "free_generation must be a bool, got 'no'"),
    (dict(max_new_tokens=0), "max_new_tokens must be None or an int >= 1, got 0"),
    (dict(new_token_slack=-1), "new_token_slack must be an int >= 0, got -1"),
])
def test_edit_quality_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EditQualityEvaluator(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# outside SequentialEditor
# --------------------------------------------------------------------------------------------------------------------


class _LanguageModelTuner(LightningModule):
    """A plain fine-tuning loop of a causal LM that knows nothing about editing; has ``.model`` and ``.tokenizer``."""

    def __init__(self):
        super().__init__()
        self.model, self.tokenizer = load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2")
        self.training_modes = []

    def training_step(self, batch, batch_idx):
        self.training_modes.append(self.model.training)
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        ids = torch.tensor([self.tokenizer("The capital of France is Paris. Rome is in Italy.")["input_ids"]] * 4)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


class _NoLanguageModel(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)


def test_general_ability_inside_a_plain_fine_tuning_loop(tmp_path, make_trainer):
    module = _LanguageModelTuner()
    module.train()
    general = GeneralAbilityEvaluator(tasks=[TaskConfig("rte", str(_write_rte(tmp_path / "nli.tsv", 3)))],
                                      every_n_edits=1, batch_size=2)
    trainer = make_trainer([general], max_epochs=1)
    trainer.fit(module)
    assert [h["step"] for h in general.history] == [0, 1, 2]  # the end (step 2) was already evaluated
    assert module.training_modes == [True, True]  # generation ran in eval mode and gave the train mode back
    assert _steps(read_csv_metrics(trainer), "general/rte/label_accuracy") == [0, 1, 2]


@pytest.mark.parametrize("make_callback", [
    lambda: GeneralAbilityEvaluator(tasks=[TaskConfig("rte", "missing.tsv")]),
    lambda: EditQualityEvaluator(),
])
def test_a_module_without_model_and_tokenizer_is_refused_in_setup(make_callback, make_trainer):
    callback = make_callback()
    with pytest.raises(AttributeError, match=r"_NoLanguageModel has no `\.model` and no `\.tokenizer`"):
        make_trainer([callback]).fit(_NoLanguageModel())


def test_edit_quality_refuses_batches_that_are_not_edit_requests(make_trainer):
    with pytest.raises(TypeError, match="expects training batches of EditRequest"):
        make_trainer([EditQualityEvaluator()]).fit(_LanguageModelTuner())


# --------------------------------------------------------------------------------------------------------------------
# the command line: YAML fragments
# --------------------------------------------------------------------------------------------------------------------


def test_shipped_fragments_parse_with_the_paper_tasks(repo_dir, monkeypatch, capsys):
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", "--trainer.callbacks+=callbacks/general_ability.yaml",
              "--trainer.callbacks+=callbacks/edit_quality.yaml", "--print_config"])
    assert exit_info.value.code == 0
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks][-2:] == \
        ["GeneralAbilityEvaluator", "EditQualityEvaluator"]
    tasks = callbacks[-2]["init_args"]["tasks"]
    assert [(t["name"], t["limit"]) for t in tasks] == [("gsm8k", 358), ("samsum", 149), ("nq", 261), ("rte", 299)]
    assert callbacks[-1]["init_args"] == {"every_n_edits": 10, "batch_size": 16, "pre_edit": True,
                                          "after_own_edit": True, "retention": True, "free_generation": True,
                                          "max_new_tokens": None, "new_token_slack": 3}


def test_cli_builds_task_configs_from_yaml(repo_dir, tmp_path, monkeypatch):
    from prune_lightning.cli import PruneEditCLI

    fragment = tmp_path / "general.yaml"
    fragment.write_text(yaml.safe_dump({
        "class_path": "prune_lightning.callbacks.GeneralAbilityEvaluator",
        "init_args": {"every_n_edits": 2, "tasks": [
            {"name": "gsm8k", "source": "data/test-reasoning.jsonl", "limit": 5},
            {"name": "rte", "source": "hub:nyu-mll/glue:rte@validation", "template": "{sentence1} ? {sentence2}"},
        ]},
    }))
    monkeypatch.chdir(repo_dir)
    cli = PruneEditCLI(run=False, args=["--config", "configs/tiny.yaml", f"--trainer.callbacks+={fragment}",
                                        f"--trainer.default_root_dir={tmp_path}",
                                        f"--trainer.logger.init_args.save_dir={tmp_path}"])
    (general,) = [c for c in cli.trainer.callbacks if isinstance(c, GeneralAbilityEvaluator)]
    assert general.every_n_edits == 2
    assert general.tasks == [TaskConfig("gsm8k", "data/test-reasoning.jsonl", limit=5, template=None),
                             TaskConfig("rte", "hub:nyu-mll/glue:rte@validation", template="{sentence1} ? {sentence2}")]


# --------------------------------------------------------------------------------------------------------------------
# order behind restraints, shards under DDP
# --------------------------------------------------------------------------------------------------------------------


def test_evaluators_run_after_a_post_hoc_restraint_listed_behind_them(tmp_path, rome_factory, make_trainer):
    from prune_lightning.callbacks import PRUNECallback

    general = GeneralAbilityEvaluator(tasks=[TaskConfig("rte", str(_write_rte(tmp_path / "nli.tsv", 2)))],
                                      every_n_edits=2)
    quality = EditQualityEvaluator(every_n_edits=2, pre_edit=False)
    prune = PRUNECallback(alpha=1e4, mode="post_hoc")
    restraints_seen = []
    for callback in (general, quality):
        evaluate = callback.evaluate

        def spy(trainer, pl_module, evaluate=evaluate, name=type(callback).__name__, **kwargs):
            restraints_seen.append((name, trainer.global_step, prune.restraints))
            return evaluate(trainer, pl_module, **kwargs)

        callback.evaluate = spy
    module = SequentialEditor(model="tiny:gpt2", editor=rome_factory(), save_edited_model=False, verbose=False)
    trainer = make_trainer([general, quality, prune])  # listed before PRUNE
    trainer.fit(module, datamodule=EditDataModule(source=str(write_counterfact(tmp_path / "cf.json", 2))))
    assert trainer.callbacks.index(general) > trainer.callbacks.index(prune)
    assert trainer.callbacks.index(quality) > trainer.callbacks.index(prune)
    # Step 2 is evaluated twice: after the second write, and at the end after the post-hoc restraint.
    seen = {name: [(step, restraints) for n, step, restraints in restraints_seen if n == name]
            for name in ("GeneralAbilityEvaluator", "EditQualityEvaluator")}
    assert seen == {"GeneralAbilityEvaluator": [(0, 0), (2, 0), (2, 1)], "EditQualityEvaluator": [(2, 0), (2, 1)]}


def test_each_rank_generates_for_its_shard(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import prune_lightning.callbacks.general_ability as general_ability

    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        seen.append(list(prompts))
        return [" True"] * len(prompts)

    monkeypatch.setattr(general_ability, "generate_batched", fake_generate)
    source = _write_rte(tmp_path / "nli.tsv", 5)
    examples = load_task("rte", str(source))
    module = SimpleNamespace(model=nn.Linear(1, 1), tokenizer=object())
    for rank in range(2):
        general = GeneralAbilityEvaluator(tasks=[TaskConfig("rte", str(source))])
        trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, loggers=[], sanity_checking=False,
                                  callback_metrics={})
        values = general.evaluate(trainer, module)
        shard = examples[rank::2]
        assert seen[-1] == [e.prompt for e in shard]
        expected = sum(e.references[0] == "entailment" for e in shard) / len(shard)
        assert values == {"general/rte/label_accuracy": pytest.approx(expected)}
    assert sorted(seen[0] + seen[1]) == sorted(e.prompt for e in examples)
