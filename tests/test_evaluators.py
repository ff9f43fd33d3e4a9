"""generate_batched, GeneralAbilityEvaluator and EditQualityEvaluator: inside ROME fits, a plain loop and the CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

from conftest import read_csv_metrics, write_counterfact
from prune_lightning import EditDataModule, EditRequest, SequentialEditor
from prune_lightning.callbacks.edit_quality import EditQualityEvaluator
from prune_lightning.callbacks.general_ability import GeneralAbilityEvaluator, TaskConfig
from prune_lightning.data.tasks import get_task, load_task
from prune_lightning.generation import generate_batched, generate_batched_ids
from prune_lightning.metrics import CounterFactScore, ZsREScore
from prune_lightning.metrics.quality import update_edit_quality
from prune_lightning.models import load_causal_lm, load_tokenizer


def _one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    """The reference: one plain ``generate`` call per prompt, no padding, in eval mode."""
    model.eval()
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


PROMPTS = [
    "The capital of France is",
    "Paris",
    "Q: What is 1 + 2? A: Let's think step by step. One plus two is three. Therefore, the answer is:",
    "The mother tongue of Danielle Darrieux is French. Toko Yasuda plays the",
    "Rome",
]


def test_generate_batched_matches_one_prompt_at_a_time(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    expected = _one_at_a_time(model, tokenizer, PROMPTS, max_new_tokens=6)
    assert len(set(expected)) > 1  # the prompts do lead to different continuations
    model.train()  # dropout on: the call must switch to eval mode and back
    assert tokenizer.padding_side == "right"
    for batch_size in (2, 5):
        assert generate_batched(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=batch_size) == expected
    assert model.training and tokenizer.padding_side == "right"


def test_generate_batched_ids_are_the_new_tokens_up_to_eos(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    model.eval()
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            expected.append(out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out)
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
    assert out == _one_at_a_time(model, tokenizer, [tail, "Rome"], max_new_tokens=4)


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
    summaries = _one_at_a_time(model, tokenizer, prompts, spec.max_new_tokens)
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


def test_evaluators_log_to_the_csv_logger_at_their_steps(evaluated_fit):
    rows = read_csv_metrics(evaluated_fit["trainer"])
    for key in ("general/gsm8k/number_match", "general/rte/label_accuracy", "general/samsum/rouge_mean"):
        assert _steps(rows, key) == [0, 3, 4]  # edit 0, every 3 edits, the end
    for score in ("efficacy", "generalization", "locality", "efficacy_margin"):
        assert _steps(rows, f"edit_quality/counterfact/{score}") == [2, 4]  # every 2 edits; the end is step 4 again
        assert _steps(rows, f"edit_quality_pre/counterfact/{score}") == [2, 4]
    assert not any(key.startswith("edit_quality/zsre") for row in rows for key, v in row.items() if v)
    assert [r["requests"] for r in evaluated_fit["quality"].history if r["score"] == "efficacy"] == [2, 2, 4, 4]


def test_general_scores_match_an_independent_evaluation_of_the_unedited_model(evaluated_fit):
    general, model, tokenizer = evaluated_fit["general"], evaluated_fit["reference_model"], evaluated_fit["tokenizer"]
    at_zero = {(h["task"], h["metric"]): h["value"] for h in general.history if h["step"] == 0}
    assert set(at_zero) == {("gsm8k", "number_match"), ("rte", "label_accuracy"), ("samsum", "rouge_mean")}
    for task in evaluated_fit["tasks"]:
        task = task if isinstance(task, TaskConfig) else TaskConfig(**task)
        spec = get_task(task.name)
        examples = load_task(task.name, task.source, limit=task.limit)
        generations = _one_at_a_time(model, tokenizer, [e.prompt for e in examples], spec.max_new_tokens)
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
    assert table["columns"] == ["step", "requests", "kind", "score", "pre_edit", "value"]
    assert table["data"] == [[h["step"], h["requests"], h["kind"], h["score"], h["pre_edit"], h["value"]]
                             for h in quality]
    assert {row[0] for row in table["data"]} == {2, 4} and len(table["data"]) == len(quality) > 0


def test_edit_quality_rises_over_pre_edit_values(evaluated_fit):
    history = evaluated_fit["quality"].history

    def value(step, score, pre):
        (row,) = [h for h in history if h["step"] == step and h["score"] == score and h["pre_edit"] is pre]
        return row["value"]

    for step in (2, 4):
        assert value(step, "efficacy_margin", False) > value(step, "efficacy_margin", True)
        assert value(step, "efficacy", False) >= value(step, "efficacy", True)
    assert value(4, "efficacy", False) == 1.0


def test_pre_edit_value_is_the_request_scored_before_its_own_edit(tmp_path, rome_factory, make_trainer):
    requests_file = write_counterfact(tmp_path / "cf.json", 2, seed=3)
    quality = EditQualityEvaluator(every_n_edits=1)
    module = SequentialEditor(model="tiny:gpt2", editor=rome_factory(), save_edited_model=False, verbose=False)
    data = EditDataModule(source=str(requests_file))
    data.setup("fit")
    first = data.requests[0]
    reference = CounterFactScore()
    update_edit_quality(reference, ZsREScore(), load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2"), [first])
    expected = {k: float(v) for k, v in reference.compute().items()}
    make_trainer([quality]).fit(module, datamodule=EditDataModule(source=str(requests_file)))
    pre_at_1 = {h["score"]: h["value"] for h in quality.history if h["step"] == 1 and h["pre_edit"]}
    post_at_1 = {h["score"]: h["value"] for h in quality.history if h["step"] == 1 and not h["pre_edit"]}
    assert pre_at_1 == pytest.approx(expected)
    assert post_at_1["efficacy_margin"] > pre_at_1["efficacy_margin"]
    assert sorted({h["step"] for h in quality.history}) == [1, 2]


# --------------------------------------------------------------------------------------------------------------------
# checkpoint state, arguments
# --------------------------------------------------------------------------------------------------------------------


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
    assert quality2._pre_states == quality._pre_states and quality2._pre_states["counterfact"]["efficacy_cases"] == 4


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
    assert callbacks[-1]["init_args"] == {"every_n_edits": 10, "batch_size": 16, "pre_edit": True}


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

        def spy(trainer, pl_module, evaluate=evaluate, name=type(callback).__name__):
            restraints_seen.append((name, trainer.global_step, prune.restraints))
            return evaluate(trainer, pl_module)

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
