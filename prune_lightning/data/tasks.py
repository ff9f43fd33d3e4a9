"""Downstream tasks of the general-ability evaluation: read a task's examples and render their prompts.

The PRUNE paper measures what sequential edits cost a model on four tasks, each a prompt completed by greedy
generation and scored against references:

- ``gsm8k`` - GSM8K reasoning (paper file ``test-reasoning.jsonl``): 5 new tokens, ``number_match`` (the gold
  number appears in the generation), 358 examples by default.
- ``samsum`` - SAMSum summarization (``test-summarization.json``): 25 new tokens, ``rouge_mean`` (mean of the
  ROUGE-1/2/L F-measures), 149 examples.
- ``nq`` - Natural Questions open-domain QA with a passage (``test-OpenDomainQA.jsonl``): 20 new tokens,
  ``span_exact_match`` (an answer is contained in the generation), 261 examples.
- ``rte`` - RTE natural language inference (``test-NLI.tsv``): 1 new token, ``label_accuracy`` after
  :func:`rte_label_from_generation`, 299 examples.

The metric names are those of :func:`prune_lightning.metrics.text.build_text_metric`; a :class:`TaskSpec` holds
them with the generation length and the default size.

Record schemas and default templates (format strings with named fields; any field listed may be used in a
custom ``template``):

- **gsm8k**: ``question``, ``answer`` (a rationale ending ``#### <number>``). Fields: ``question``, ``rationale``
  (the answer text before ``####``, stripped, calculator annotations ``<<...>>`` and newlines kept as in the data),
  ``answer`` (the number). Reference: the number. The paper's protocol puts the rationale into the prompt::

      Q: {question} A:Let's think step by step. {rationale} Therefore, the answer (arabic numerals) is:

- **samsum**: ``id`` (optional), ``dialogue``, ``summary``. Fields: ``dialogue``, ``id``. Reference: the summary,
  stripped. The dialogue is kept exactly as in the data - the paper's file separates turns by ``"\\r\\n"``, and
  they are not normalised, so a prompt holds the data byte for byte. Template ``"{dialogue}\\nTL;DR:"``.
- **nq**: ``question``, ``answer`` (a list of acceptable answers, or one string), ``output`` (a list whose first
  element is the supporting passage; its leading newlines are stripped). Fields: ``passage``, ``question``.
  References: the answers. Template: ``"Refer to the passage below and answer the following question.
  Passage: {passage} Question: {question}. Answer:"``. (The hub's ``nq_open`` has no passages: it cannot feed
  this template.)
- **rte**: ``sentence1``, ``sentence2``, ``label`` (``entailment`` / ``not_entailment``, or GLUE's class ids
  0 / 1), optional ``index`` / ``idx``. Fields: ``sentence1``, ``sentence2``. Reference: the label. Template:
  ``"{sentence1} entails the {sentence2}. True or False? answer:"``; the generation is mapped to a label by
  :func:`rte_label_from_generation`.

Sources. ``load_task(name, source)`` reads

- a local file: ``.jsonl`` / ``.ndjson`` (one object a line; blank lines skipped), ``.json`` (an array of objects,
  or JSON lines if it does not start with ``[``), ``.tsv`` / ``.csv`` (a header row, then one record a line;
  tab-separated files are read without quote processing, as GLUE's are);
- a Hugging Face hub dataset: ``"hub:<id>[:<config>][@<split>]"`` or, where no such file exists and the string
  has no file suffix, the bare ``"<id>[:<config>][@<split>]"`` (e.g. ``"gsm8k:main"``, ``"glue:rte@validation"``);
  the split defaults to ``test``;
- a ``datasets.Dataset``, or a list of dicts already in memory.

Which examples: the first ``limit`` records in source order. ``limit=None`` means the task's default size (the
paper's); ``limit=0`` or ``limit=-1`` means all records.

Errors. A malformed record raises one :class:`TaskRecordError` (a ``ValueError``) naming the source, where the
record is (``line N``, 1-based, for JSON lines and TSV - the header is line 1; ``element N``, 0-based, for a JSON
array; ``row N``, 0-based, for a dataset or a list in memory) and the field, e.g.
``"test-reasoning.jsonl: line 12: field 'answer': no '####' before the final number"``.

More tasks. :func:`register_task` adds a task type: a *reader* turns one record (a dict) into a
:class:`TaskRecord` (template fields, references, meta) and raises :class:`TaskFieldError` for a bad field; the
loader adds the source and location.
"""

from __future__ import annotations

import csv
import itertools
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from prune_lightning.io import SourceError, json_records, read_text
from prune_lightning.metrics.text import TEXT_METRICS, normalize_number

__all__ = [
    "RTE_LABELS",
    "RTE_INVALID",
    "TaskExample",
    "TaskFieldError",
    "TaskRecord",
    "TaskRecordError",
    "TaskSpec",
    "get_task",
    "load_task",
    "register_task",
    "required_text",
    "required_texts",
    "rte_label_from_generation",
    "task_names",
]

RTE_LABELS = ("entailment", "not_entailment")
RTE_INVALID = "invalid"
_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".tsv", ".csv")
_HUB_PREFIX = "hub:"
_DEFAULT_SPLIT = "test"


# --------------------------------------------------------------------------------------------------------------------
# data types
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskExample:
    """One downstream example, ready to generate from.

    Args:
        prompt: The rendered prompt.
        references: The acceptable answers (a summary, a number, a label, ...).
        task: The task's name.
        index: Position of the record in its source, counted from 0.
        meta: Extra data from the record (ids, the question, ...), for logging.
    """

    prompt: str
    references: tuple[str, ...]
    task: str
    index: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TaskRecord:
    """What a task reader makes of one record.

    Args:
        fields: The values a template may use (``{question}``, ...).
        references: The acceptable answers.
        meta: Extra data carried to :attr:`TaskExample.meta`.
    """

    fields: Mapping[str, str]
    references: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)


class TaskFieldError(ValueError):
    """Raised by a task reader for a bad field of one record; :func:`load_task` adds the source and location.

    Args:
        field: The record's key (``"answer"``, ``"output[0]"``).
        problem: What is wrong with it.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field '{field}': {problem}")


class TaskRecordError(ValueError):
    """A record of a task's source is malformed. The message reads ``"{source}: {location}: field '{f}': {problem}"``.

    Args:
        source: The file, hub dataset or ``<records>``.
        location: ``"line 12"`` (JSON lines, TSV; 1-based), ``"element 3"`` (JSON array) or ``"row 3"``.
        field: The offending key, or ``None`` when the record as a whole is wrong (not valid JSON, ...).
        problem: What is wrong.
    """

    def __init__(self, source: Any, location: str, field: Optional[str], problem: str) -> None:
        self.source = str(source)
        self.location = location
        self.field = field
        self.problem = problem
        where = f"{self.source}: {location}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (type(self), (self.source, self.location, self.field, self.problem))


Reader = Callable[[Mapping[str, Any]], TaskRecord]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task type (see :func:`register_task`).

    Args:
        name: The task's name (``"gsm8k"``).
        reader: Turns one record into a :class:`TaskRecord`; raises :class:`TaskFieldError`.
        default_template: A format string with named fields.
        max_new_tokens: How many tokens to generate for a prompt.
        metric: Name of the score in :data:`prune_lightning.metrics.text.TEXT_METRICS`.
        default_size: Examples read when ``limit`` is None (``None``: all).
        postprocess: Maps a generation to what the metric compares (e.g. a label); ``None``: the generation itself.
    """

    name: str
    reader: Reader
    default_template: str
    max_new_tokens: int
    metric: str
    default_size: Optional[int] = None
    postprocess: Optional[Callable[[str], str]] = None

    def render(self, fields: Mapping[str, Any], template: Optional[str] = None) -> str:
        """Fills ``template`` (default: the task's) with a record's fields."""
        template = self.default_template if template is None else template
        try:
            return template.format_map(fields)
        except KeyError as err:
            raise ValueError(
                f"template for task {self.name!r} refers to field {err.args[0]!r}; this task's records provide "
                f"{sorted(fields)}"
            ) from None

    def prediction(self, generation: str) -> str:
        """What the metric scores for a generation: ``postprocess(generation)``, or the generation itself."""
        return generation if self.postprocess is None else self.postprocess(generation)

    def make_metric(self, **kwargs: Any):
        """A fresh metric for this task (``update(predictions, [example.references, ...])``)."""
        from prune_lightning.metrics.text import build_text_metric

        return build_text_metric(self.metric, **kwargs)


_TASKS: dict[str, TaskSpec] = {}


def _check_template(template: Any, what: str) -> str:
    if not isinstance(template, str) or not template:
        raise ValueError(f"{what} must be a non-empty format string, got {template!r}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"{what} {template!r} is not a valid format string: {err}") from None
    for name in names:
        if name == "" or name.isdigit():
            raise ValueError(f"{what} {template!r} uses a positional field; use named fields such as '{{question}}'")
    return template


def register_task(
    name: str,
    reader: Reader,
    default_template: str,
    max_new_tokens: int,
    metric: str,
    default_size: Optional[int] = None,
    postprocess: Optional[Callable[[str], str]] = None,
    overwrite: bool = False,
) -> TaskSpec:
    """Adds a task type that :func:`load_task` can read.

    Args:
        name: The task's name.
        reader: ``reader(record) -> TaskRecord`` for one record (a dict); raises :class:`TaskFieldError` naming the
            bad key.
        default_template: Format string with named fields from the reader's ``TaskRecord.fields``.
        max_new_tokens: Tokens to generate per prompt (>= 1).
        metric: A name known to :func:`prune_lightning.metrics.text.build_text_metric`.
        default_size: Examples read when ``limit`` is None (``None``: all).
        postprocess: Maps a generation to the metric's prediction.
        overwrite: Replace a task of the same name.

    Returns:
        The registered :class:`TaskSpec`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in _TASKS and not overwrite:
        raise ValueError(f"a task named {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(reader):
        raise ValueError(f"reader for task {name!r} must be callable, got {reader!r}")
    _check_template(default_template, "default_template")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if metric not in TEXT_METRICS:
        raise ValueError(f"unknown metric {metric!r} for task {name!r}; known: {sorted(TEXT_METRICS)}")
    if default_size is not None and (
        isinstance(default_size, bool) or not isinstance(default_size, int) or default_size < 1
    ):
        raise ValueError(f"default_size must be None or an int >= 1, got {default_size!r}")
    if postprocess is not None and not callable(postprocess):
        raise ValueError(f"postprocess for task {name!r} must be callable or None, got {postprocess!r}")
    spec = TaskSpec(name, reader, default_template, max_new_tokens, metric, default_size, postprocess)
    _TASKS[name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` registered under ``name``."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {task_names()}")
    return _TASKS[name]


def task_names() -> list[str]:
    """The names of all registered tasks, sorted."""
    return sorted(_TASKS)


# --------------------------------------------------------------------------------------------------------------------
# field helpers for readers
# --------------------------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def required_text(record: Mapping[str, Any], key: str) -> str:
    """A non-empty string field of a task record; a :class:`TaskFieldError` naming ``key`` otherwise."""
    if key not in record:
        raise TaskFieldError(key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise TaskFieldError(key, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise TaskFieldError(key, "is empty")
    return value


def required_texts(record: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A list of non-empty strings (a lone string counts as a list of one)."""
    if key not in record:
        raise TaskFieldError(key, "missing")
    value = record[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TaskFieldError(key, f"expected a list of strings, got {_type_name(value)}")
    if not value:
        raise TaskFieldError(key, "is an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TaskFieldError(f"{key}[{i}]", f"expected a string, got {_type_name(item)}")
        if not item.strip():
            raise TaskFieldError(f"{key}[{i}]", "is empty")
    return tuple(value)


# --------------------------------------------------------------------------------------------------------------------
# the paper's four tasks
# --------------------------------------------------------------------------------------------------------------------

GSM8K_TEMPLATE = "Q: {question} A:Let's think step by step. {rationale} Therefore, the answer (arabic numerals) is:"
SAMSUM_TEMPLATE = "{dialogue}\nTL;DR:"
NQ_TEMPLATE = (
    "Refer to the passage below and answer the following question. Passage: {passage} Question: {question}. Answer:"
)
RTE_TEMPLATE = "{sentence1} entails the {sentence2}. True or False? answer:"


def read_gsm8k_record(record: Mapping[str, Any]) -> TaskRecord:
    """GSM8K: ``question``, ``answer`` = rationale + ``"#### <number>"``."""
    question = required_text(record, "question")
    answer = required_text(record, "answer")
    rationale, sep, number = answer.rpartition("####")
    if not sep:
        raise TaskFieldError("answer", "no '####' before the final number")
    number = number.strip()
    if normalize_number(number) is None:
        raise TaskFieldError("answer", f"the text after '####' is not a number: {number!r}")
    rationale = rationale.strip()
    return TaskRecord(
        fields={"question": question, "rationale": rationale, "answer": number},
        references=(number,),
        meta={"question": question},
    )


def read_samsum_record(record: Mapping[str, Any]) -> TaskRecord:
    """SAMSum: ``id`` (optional), ``dialogue``, ``summary``; the dialogue is kept as it is."""
    dialogue = required_text(record, "dialogue")
    summary = required_text(record, "summary")
    ident = record.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise TaskFieldError("id", f"expected a string or an int, got {_type_name(ident)}")
    return TaskRecord(
        fields={"dialogue": dialogue, "id": "" if ident is None else str(ident)},
        references=(summary.strip(),),
        meta={"id": ident},
    )


def read_nq_record(record: Mapping[str, Any]) -> TaskRecord:
    """Natural Questions with a passage: ``question``, ``answer`` (list), ``output`` (list; first = passage)."""
    question = required_text(record, "question")
    answers = required_texts(record, "answer")
    passage = required_texts(record, "output")[0].strip()
    return TaskRecord(
        fields={"passage": passage, "question": question},
        references=tuple(a.strip() for a in answers),
        meta={"question": question},
    )


def read_rte_record(record: Mapping[str, Any]) -> TaskRecord:
    """RTE: ``sentence1``, ``sentence2``, ``label`` (a label name or GLUE's class id), optional ``index``/``idx``."""
    sentence1 = required_text(record, "sentence1")
    sentence2 = required_text(record, "sentence2")
    if "label" not in record:
        raise TaskFieldError("label", "missing")
    label = record["label"]
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(RTE_LABELS):
            raise TaskFieldError(
                "label", f"class id {label} is not 0 (entailment) or 1 (not_entailment); an unlabelled test split?"
            )
        label = RTE_LABELS[label]
    elif isinstance(label, str) and label.strip() in RTE_LABELS:
        label = label.strip()
    else:
        raise TaskFieldError("label", f"expected one of {list(RTE_LABELS)} (or 0 / 1), got {label!r}")
    index = record.get("index", record.get("idx"))
    return TaskRecord(
        fields={"sentence1": sentence1, "sentence2": sentence2}, references=(label,), meta={"index": index}
    )


def rte_label_from_generation(text: str) -> str:
    """Maps an RTE generation to a label by its first word: ``true`` -> ``entailment``, ``false`` ->
    ``not_entailment`` (case-insensitive, surrounding punctuation ignored); anything else -> ``"invalid"``.

    Example:
        >>> rte_label_from_generation(" True."), rte_label_from_generation("FALSE"), rte_label_from_generation("yes")
        ('entailment', 'not_entailment', 'invalid')
    """
    words = text.split()
    first = words[0].strip(string.punctuation).lower() if words else ""
    return {"true": "entailment", "false": "not_entailment"}.get(first, RTE_INVALID)


register_task("gsm8k", read_gsm8k_record, GSM8K_TEMPLATE, 5, "number_match", default_size=358)
register_task("samsum", read_samsum_record, SAMSUM_TEMPLATE, 25, "rouge_mean", default_size=149)
register_task("nq", read_nq_record, NQ_TEMPLATE, 20, "span_exact_match", default_size=261)
register_task(
    "rte", read_rte_record, RTE_TEMPLATE, 1, "label_accuracy", default_size=299, postprocess=rte_label_from_generation
)


# --------------------------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------------------------

Located = tuple[str, Any]  # ("line 3", record)


def _iter_table(path: Path, delimiter: str) -> Iterator[Located]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        if delimiter == "\t":  # GLUE's TSVs hold unbalanced quotes: read them literally
            rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            rows = csv.reader(handle, delimiter=delimiter)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header row naming the columns")
        header = [h.strip() for h in header]
        for row in rows:
            where = f"line {rows.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                missing = header[len(row)]
                raise TaskRecordError(
                    path, where, missing, f"missing (the row has {len(row)} of the header's {len(header)} columns)"
                )
            if len(row) > len(header):
                raise TaskRecordError(
                    path, where, None, f"has {len(row)} columns but the header has {len(header)}: {header}"
                )
            yield where, dict(zip(header, row))


def _iter_file(path: Path) -> Iterator[Located]:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        yield from _iter_table(path, "\t")
        return
    if suffix == ".csv":
        yield from _iter_table(path, ",")
        return
    text = read_text(path)
    if suffix not in (".json", ".jsonl", ".ndjson") and text.lstrip()[:1] not in ("[", "{"):
        raise ValueError(f"{path}: cannot tell the file's format; use one of the suffixes {list(_FILE_SUFFIXES)}")
    try:
        yield from json_records(path, text)
    except SourceError as err:
        if err.line is None:
            raise
        raise TaskRecordError(path, f"line {err.line}", None, err.problem) from None


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "select") and hasattr(obj, "column_names") and hasattr(obj, "__len__")


def _looks_like_hub_id(source: str) -> bool:
    """``"gsm8k:main"``, ``"openai/gsm8k@test"``: no file suffix, not an explicit relative or absolute path."""
    dataset_id = source.split("@", 1)[0].split(":", 1)[0]
    return Path(dataset_id).suffix.lower() not in _FILE_SUFFIXES and not source.startswith((".", "/", "~"))


def _hub_spec(source: str) -> str:
    spec = source if source.startswith(_HUB_PREFIX) else _HUB_PREFIX + source
    return spec if "@" in spec else f"{spec}@{_DEFAULT_SPLIT}"


def _located_records(source: Any, limit: Optional[int]) -> tuple[str, Iterator[Located]]:
    """``(name for messages, iterator of (location, record))`` for any supported source."""
    if isinstance(source, (list, tuple)):
        return "<records>", ((f"row {i}", r) for i, r in enumerate(source))
    if _is_dataset(source):
        from prune_lightning.data.sources import source_name

        stop = len(source) if limit is None else min(limit, len(source))
        part = source.select(range(stop))
        return source_name(source), ((f"row {i}", r) for i, r in enumerate(part))
    if isinstance(source, (str, Path)):
        text = str(source)
        path = Path(text).expanduser()
        if isinstance(source, str) and (
            text.startswith(_HUB_PREFIX) or (not path.exists() and _looks_like_hub_id(text))
        ):
            from prune_lightning.data.sources import read_records

            spec = _hub_spec(text)
            name, records = read_records(spec, limit=limit)
            return name, ((f"row {i}", r) for i, r in enumerate(records))
        if not path.exists():
            raise FileNotFoundError(
                f"{source}: no such file. A task source is a local file ({', '.join(_FILE_SUFFIXES)}), a hub "
                f"dataset 'hub:<id>[:<config>][@<split>]', a datasets.Dataset or a list of dicts"
            )
        if not path.is_file():
            raise ValueError(f"{source}: is not a file")
        return str(path), _iter_file(path)
    raise TypeError(
        f"a task source must be a path, a hub id, a datasets.Dataset or a list of dicts, got {type(source).__name__}"
    )


def _resolve_limit(limit: Optional[int], spec: TaskSpec) -> Optional[int]:
    """``None`` -> the task's default size; ``0`` / ``-1`` -> all (``None``); ``n > 0`` -> ``n``."""
    if limit is None:
        return spec.default_size
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < -1:
        raise ValueError(f"limit must be None (the task's default size), 0 or -1 (all) or an int >= 1, got {limit!r}")
    return None if limit in (0, -1) else limit


def load_task(
    name: str, source: Any, limit: Optional[int] = None, template: Optional[str] = None
) -> list[TaskExample]:
    """Reads a downstream task's first ``limit`` examples and renders their prompts.

    Args:
        name: A registered task: ``gsm8k``, ``samsum``, ``nq``, ``rte`` or one added by :func:`register_task`.
        source: A local file, ``"hub:<id>[:<config>][@<split>]"`` (or a bare ``"<id>[:<config>]"`` that is not a
            file; split ``test`` by default), a ``datasets.Dataset``, or a list of dicts.
        limit: ``None``: the task's default size (the paper's); ``0`` or ``-1``: all records; ``n``: the first n.
        template: A format string with named fields overriding the task's default template.

    Returns:
        The examples, in source order.

    Raises:
        TaskRecordError: For a malformed record, naming the source, line (or element / row) and field.
        ValueError: For an unknown task, a bad ``limit`` or a template naming a field the task does not provide.
    """
    spec = get_task(name)
    limit = _resolve_limit(limit, spec)
    template = spec.default_template if template is None else _check_template(template, "template")
    source_label, located = _located_records(source, limit)
    examples: list[TaskExample] = []
    for index, (where, record) in enumerate(itertools.islice(located, limit)):  # stops before reading past limit
        if not isinstance(record, Mapping):
            raise TaskRecordError(source_label, where, None, f"expected an object (dict), got {_type_name(record)}")
        try:
            parsed = spec.reader(record)
        except TaskFieldError as err:
            raise TaskRecordError(source_label, where, err.field, err.problem) from None
        except KeyError as err:  # a reader that indexes the record directly: the key is missing
            raise TaskRecordError(source_label, where, str(err.args[0]) if err.args else None, "missing") from None
        if not isinstance(parsed, TaskRecord):
            raise TypeError(f"the reader of task {name!r} returned {type(parsed).__name__}, expected a TaskRecord")
        prompt = spec.render(parsed.fields, template)
        examples.append(
            TaskExample(
                prompt=prompt, references=tuple(parsed.references), task=name, index=index, meta=dict(parsed.meta)
            )
        )
    return examples
