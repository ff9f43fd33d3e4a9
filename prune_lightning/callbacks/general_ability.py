"""General abilities of the edited model: downstream tasks scored as edits accumulate.

The PRUNE paper's other axis beside edit success: what sequential edits cost a model elsewhere. Its protocol runs
four tasks by greedy generation - GSM8K reasoning, SAMSum summarization, Natural Questions open-domain QA, RTE
inference (see :mod:`prune_lightning.data.tasks`) - and plots each score against the number of edits.

``GeneralAbilityEvaluator`` does that inside ``Trainer.fit``: at edit 0 (before any edit), after every
``every_n_edits``-th write and at the end of fit, it generates the continuation of every task prompt
(:func:`~prune_lightning.generation.generate_batched`: batched, left-padded, greedy, ``max_new_tokens`` of the task)
and logs ``general/<task>/<metric>`` (e.g. ``general/gsm8k/number_match``) to every logger at the step = edits so
far. The scores are also kept in :attr:`GeneralAbilityEvaluator.history`, and at the end of fit the whole table of
score against edits goes to the loggers that take tables (W&B's ``log_table``).

When it measures. Always after the restraint callbacks of the same write (PRUNE, RECT), whatever order the
callbacks are listed in; the end-of-fit evaluation follows a post-hoc restraint. It is skipped when the model was
already evaluated at that step and no restraint runs post hoc (nothing could have changed).

Distributed. Each rank generates for its shard of every task (examples ``rank::world_size``) and updates the task's
metric with it; the torchmetrics metrics sum their states (score sums and example counts) across ranks in
``compute()``, which every rank calls - also a rank whose shard is empty - so the logged score is that of all
examples, the single-process score, and :attr:`GeneralAbilityEvaluator.history` holds it on every rank. Loggers write
on rank 0 only.

Where. Inside :class:`~prune_lightning.SequentialEditor` and inside any LightningModule that has ``.model`` (a Hugging
Face causal LM) and ``.tokenizer``; other modules are refused in ``setup``. The tasks' examples are read once, in
``setup`` of ``fit``. Validate / test runs do nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from prune_lightning.callbacks._matrices import log_metrics
from prune_lightning.loggers import log_table
from prune_lightning.callbacks._schedule import EditSchedule, Scheduled, run_after_restraints
from prune_lightning.data.tasks import TaskExample, get_task, load_task
from prune_lightning.generation import find_language_model, generate_batched

__all__ = ["GeneralAbilityEvaluator", "TaskConfig", "task_score"]

TABLE_KEY = "general_ability"
TABLE_COLUMNS = ["step", "task", "metric", "value"]


@dataclass
class TaskConfig:
    """One downstream task of the general-ability evaluation.

    Args:
        name: A registered task: ``gsm8k``, ``samsum``, ``nq``, ``rte`` (or one added with ``register_task``).
        source: Where its records are: a local file in the paper's format (``.jsonl``, ``.json``, ``.tsv``), or a hub
            dataset ``"hub:<id>[:<config>][@<split>]"`` (split ``test`` by default).
        limit: How many examples (the first ones): ``None`` - the paper's size for the task; ``0`` or ``-1`` - all.
        template: A format string overriding the task's prompt template (named fields, e.g. ``"{question}"``).
    """

    name: str
    source: str
    limit: Optional[int] = None
    template: Optional[str] = None


def _as_task_config(task: Any, index: int) -> TaskConfig:
    if isinstance(task, TaskConfig):
        config = task
    elif isinstance(task, Mapping):
        unknown = sorted(set(task) - {"name", "source", "limit", "template"})
        if unknown:
            raise ValueError(
                f"GeneralAbilityEvaluator: tasks[{index}] has unknown key(s) {unknown}; "
                "a task has name, source, limit, template"
            )
        if "name" not in task or "source" not in task:
            raise ValueError(f"GeneralAbilityEvaluator: tasks[{index}] = {dict(task)!r} needs a name and a source")
        config = TaskConfig(**dict(task))
    else:
        raise ValueError(
            f"GeneralAbilityEvaluator: tasks[{index}] must be a TaskConfig or a dict with name and source, "
            f"got {task!r}"
        )
    if not isinstance(config.name, str) or not config.name:
        raise ValueError(f"GeneralAbilityEvaluator: tasks[{index}].name must be a task name, got {config.name!r}")
    get_task(config.name)  # an unknown task fails here, listing the registered ones
    limit = config.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < -1):
        raise ValueError(
            f"GeneralAbilityEvaluator: tasks[{index}].limit must be None, 0 / -1 (all) or an int >= 1, got {limit!r}"
        )
    return config


class GeneralAbilityEvaluator(Scheduled, Callback):
    """Scores downstream tasks (GSM8K, SAMSum, NQ, RTE, ...) on the model at edit 0, every n edits and at the end.

    Args:
        tasks: The tasks, each with ``name``, ``source`` and optionally ``limit`` (default: the paper's size) and
            ``template``. Dicts are accepted as well as :class:`TaskConfig`.
        every_n_edits: Evaluate after every n-th write (optimizer step). Edit 0 and the end of fit are evaluated too
            (the end unless that step was just evaluated and no restraint runs post hoc).
        batch_size: Prompts per ``generate`` call.
    """

    def __init__(
        self,
        tasks: list[TaskConfig],
        every_n_edits: int = 10,
        batch_size: int = 16,
    ) -> None:
        if isinstance(tasks, (str, Mapping, TaskConfig)) or not isinstance(tasks, Sequence):
            raise ValueError(f"GeneralAbilityEvaluator: tasks must be a list of task configs, got {tasks!r}")
        if not tasks:
            raise ValueError("GeneralAbilityEvaluator: tasks is empty; give at least one task (name and source)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"GeneralAbilityEvaluator: batch_size must be an int >= 1, got {batch_size!r}")
        self.tasks = [_as_task_config(task, i) for i, task in enumerate(tasks)]
        names = [task.name for task in self.tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"GeneralAbilityEvaluator: task(s) {duplicates} listed more than once; their metrics would share keys"
            )
        self.schedule = EditSchedule("GeneralAbilityEvaluator", every_n_edits)
        self.batch_size = batch_size
        self.history: list[dict[str, Any]] = []
        self._examples: Optional[dict[str, list[TaskExample]]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tasks=[task.name for task in self.tasks], every_n_edits=self.every_n_edits)

    # ------------------------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        find_language_model(pl_module, type(self).__name__)
        run_after_restraints(trainer, self)
        if self._examples is None:
            self._examples = self.load_examples()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.at_start(trainer):
            self.evaluate(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.schedule.after_write(trainer):
            self.evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.at_end(trainer, after_restraints=True):
            self.evaluate(trainer, pl_module)
        self._log_table(trainer)

    # ------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------

    def load_examples(self) -> dict[str, list[TaskExample]]:
        """Reads every task's examples (``load_task``); called once, in ``setup``."""
        examples = {}
        for task in self.tasks:
            examples[task.name] = load_task(task.name, task.source, limit=task.limit, template=task.template)
            if not examples[task.name]:
                raise ValueError(f"GeneralAbilityEvaluator: task {task.name!r} has no examples in {task.source!r}")
            rank_zero_info(
                f"GeneralAbilityEvaluator: {len(examples[task.name])} {task.name} examples from {task.source}"
            )
        return examples

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Generates for every task on the current model and logs ``general/<task>/<metric>``; returns those values."""
        if self._examples is None:
            self._examples = self.load_examples()
        model, tokenizer = find_language_model(pl_module, type(self).__name__)
        device = next(model.parameters()).device
        rank, world_size = trainer.global_rank, trainer.world_size
        step = trainer.global_step
        metrics: dict[str, float] = {}
        for task in self.tasks:
            spec = get_task(task.name)
            shard = self._examples[task.name][rank::world_size]
            value = task_score(task.name, model, tokenizer, shard, batch_size=self.batch_size, device=device)
            metrics[f"general/{task.name}/{spec.metric}"] = value
            self.history.append({"step": step, "task": task.name, "metric": spec.metric, "value": value})
        self.schedule.done(trainer)
        log_metrics(trainer, metrics, step)
        return metrics

    def _log_table(self, trainer: Trainer) -> None:
        log_table(trainer, TABLE_KEY, TABLE_COLUMNS, [[row[c] for c in TABLE_COLUMNS] for row in self.history])

    # ------------------------------------------------------------------------------------------------------------
    # checkpoint
    # ------------------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.schedule.state_dict(), "history": [dict(row) for row in self.history],
                "tasks": [asdict(task) for task in self.tasks]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
        self.history = [dict(row) for row in state_dict.get("history", [])]


def task_score(task: str, model: Any, tokenizer: Any, examples: Sequence[TaskExample], batch_size: int = 16,
               device: Any = None) -> float:
    """A registered task's score of ``model`` on ``examples``: batched greedy generation, the task's prediction rule
    and metric. Under a process group every rank calls it with its own shard (possibly empty): the metric's states
    are summed across ranks, and ``generate_batched`` keeps a sharded model's forwards paired.

    Args:
        task: The task's registered name (:func:`~prune_lightning.data.tasks.get_task`).
        model: A causal LM.
        tokenizer: Its tokenizer.
        examples: This process's examples of the task.
        batch_size: Prompts per ``generate`` call.
        device: Where the metric's states live (default: the model's).
    """
    spec = get_task(task)
    metric = spec.make_metric().to(device if device is not None else next(model.parameters()).device)
    generations = generate_batched(model, tokenizer, [e.prompt for e in examples], spec.max_new_tokens,
                                   batch_size=batch_size)
    if examples:
        metric.update([spec.prediction(g) for g in generations], [list(e.references) for e in examples])
    return float(_compute(metric))


def _compute(metric: Any) -> Any:
    # A rank whose shard is empty never called update(); its zero states still join the sum across ranks.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*compute.* was called before the .*update.*")
        return metric.compute()
