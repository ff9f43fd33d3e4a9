"""The demo's general-ability tasks, served by the same code as GSM8K, SAMSum, Natural Questions and RTE.

Importing this module (it is imported by :mod:`prune_lightning.demo`) registers four tasks with
:func:`prune_lightning.data.tasks.register_task`. Their files are written by
:meth:`prune_lightning.demo.world.World.write_tasks`, one JSON-lines file each:

- ``demo-arithmetic`` (``arithmetic.jsonl``): ``{"question": "8 + 7", "answer": "15"}``; prompt ``"8 + 7 ="``;
  3 new tokens; ``number_match`` on the generation's first word.
- ``demo-entailment`` (``entailment.jsonl``): RTE's ``sentence1``, ``sentence2``, ``label``; prompt
  ``"The cup is red. Claim: The cup is blue. True or False?"``; 1 new token, whose word (``True`` / ``False``) is
  mapped to RTE's labels by :func:`~prune_lightning.data.tasks.rte_label_from_generation`; ``label_accuracy``.
- ``demo-copy`` (``copy.jsonl``): ``{"text": "sun cat tree"}``; prompt ``"Repeat: sun cat tree =>"``; 8 new tokens;
  ``exact_match`` (normalised equality) on the generation's first line.
- ``demo-facts`` (``facts.jsonl``): ``{"prompt": "Tamo Rivek lives in", "answer": "Oslo"}``; prompt the fact's first
  phrasing; 3 new tokens; ``span_exact_match``.

``demo-facts`` asks about facts whose subjects the requests do not edit (see ``World.write_tasks(n_requests=...)``):
a drop there is collateral damage.
"""

from __future__ import annotations

from typing import Any, Mapping

from prune_lightning.data.tasks import (
    TaskFieldError,
    TaskRecord,
    read_rte_record,
    register_task,
    rte_label_from_generation,
)
from prune_lightning.data.tasks import required_text
from prune_lightning.demo.world import ARITHMETIC_TEMPLATE, COPY_TEMPLATE, ENTAILMENT_TEMPLATE
from prune_lightning.metrics.text import normalize_number

__all__ = [
    "DEMO_TASKS",
    "first_line",
    "first_word",
    "read_arithmetic_record",
    "read_copy_record",
    "read_fact_record",
]

DEMO_TASKS = ("demo-arithmetic", "demo-entailment", "demo-copy", "demo-facts")


def read_arithmetic_record(record: Mapping[str, Any]) -> TaskRecord:
    """``{"question": "8 + 7", "answer": "15"}`` -> field ``question``, reference ``"15"``."""
    question = required_text(record, "question")
    answer = required_text(record, "answer").strip()
    if normalize_number(answer) is None:
        raise TaskFieldError("answer", f"not a number: {answer!r}")
    return TaskRecord(fields={"question": question}, references=(answer,), meta={"question": question})


def read_copy_record(record: Mapping[str, Any]) -> TaskRecord:
    """``{"text": "sun cat tree"}`` -> field ``text``, reference the text itself."""
    text = required_text(record, "text").strip()
    return TaskRecord(fields={"text": text}, references=(text,))


def read_fact_record(record: Mapping[str, Any]) -> TaskRecord:
    """``{"prompt": "Tamo Rivek lives in", "answer": "Oslo", "subject": ...}`` -> field ``prompt``, reference."""
    prompt = required_text(record, "prompt")
    answer = required_text(record, "answer").strip()
    return TaskRecord(fields={"prompt": prompt}, references=(answer,), meta={"subject": record.get("subject")})


def first_word(generation: str) -> str:
    """The first whitespace-separated word of a generation (``" 15\\n3 + 4"`` -> ``"15"``)."""
    words = generation.split()
    return words[0] if words else ""


def first_line(generation: str) -> str:
    """The first non-empty line of a generation, stripped."""
    for line in generation.splitlines():
        if line.strip():
            return line.strip()
    return ""


# overwrite=True: re-importing (importlib.reload) must not fail; the names are the demo's own.
register_task(
    "demo-arithmetic", read_arithmetic_record, ARITHMETIC_TEMPLATE, 3, "number_match", postprocess=first_word,
    overwrite=True,
)
register_task(
    "demo-entailment", read_rte_record, ENTAILMENT_TEMPLATE, 1, "label_accuracy",
    postprocess=rte_label_from_generation, overwrite=True,
)
register_task("demo-copy", read_copy_record, COPY_TEMPLATE, 8, "exact_match", postprocess=first_line, overwrite=True)
register_task("demo-facts", read_fact_record, "{prompt}", 3, "span_exact_match", overwrite=True)
