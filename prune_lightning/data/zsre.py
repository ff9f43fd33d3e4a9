"""Reader for zsRE as split by MEND (Mitchell et al., 2022) and used by ROME, MEMIT, PRUNE and EasyEdit.

One record of ``zsre_mem_eval.json``::

    {
      "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
      "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
      "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
      "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
      "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"
    }

Mapping to :class:`~prune_lightning.data.EditRequest`:

- ``prompt``: ``src`` with the first occurrence of ``subject`` replaced by ``{}`` (other braces are escaped); a
  subject that does not occur in ``src`` is an error on field ``subject``.
- ``target_new``: ``answers[0]`` with ``target="answers"`` (the ROME / MEMIT convention), or ``alt`` with
  ``target="alt"`` (the EasyEdit convention). There is no true target: ``target_true`` is ``None``.
- ``paraphrase_prompts``: ``rephrase`` (one string or a list) as complete prompts, subject written in - the same
  form as CounterFact's paraphrases; they are not turned into templates.
- ``neighborhood_prompts`` / ``neighborhood_targets``: ``loc + "?"`` and ``loc_ans`` (each one string or a list
  of equal length). The ``"nq question: "`` prefix stays, as in the authors' evaluation (``kmeng01/rome``
  ``dsets/zsre.py`` scores ``record["loc"] + "?"`` followed by the answer's tokens); a question that already ends in
  ``"?"`` gets no second one.
- ``case_id``: the record's ``case_id`` or ``id`` if it has one, else its index in the file.

``pred`` (the base model's prediction) and ``cond`` are not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from prune_lightning.data.requests import EditRequest, RecordFields
from prune_lightning.data.sources import read_records

__all__ = ["read_zsre", "zsre_request", "ZSRE_TARGETS"]

ZSRE_TARGETS = ("answers", "alt")


def _loc_prompt(question: str) -> str:
    """The locality prompt of a ``loc`` question: the question and a question mark (ROME's ``dsets/zsre.py``)."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def _template(src: str, subject: str) -> Optional[str]:
    """``src`` with the first occurrence of ``subject`` replaced by ``{}`` (and other braces escaped)."""
    at = src.find(subject)
    if at < 0:
        return None

    def esc(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    return esc(src[:at]) + "{}" + esc(src[at + len(subject) :])


def _check_target(target: str) -> None:
    if target not in ZSRE_TARGETS:
        raise ValueError(f"zsRE target must be one of {ZSRE_TARGETS}, got {target!r}")


def zsre_request(record: Any, name: str = "<record>", index: int = 0, target: str = "answers") -> EditRequest:
    """Turns one zsRE record into an :class:`EditRequest`.

    Args:
        record: The record (a dict in MEND's zsRE schema).
        name: The file it comes from, for error messages.
        index: Its index in that file, for error messages and as the default ``case_id``.
        target: ``"answers"`` (``answers[0]``, ROME/MEMIT) or ``"alt"`` (EasyEdit) as the new target.

    Raises:
        RecordError: naming ``name``, ``index`` and the field that is missing, mistyped or invalid.
    """
    _check_target(target)
    rec = RecordFields(record, name, index)
    subject = rec.text("subject")
    src = rec.text("src")
    if target == "answers":
        answers = rec.texts("answers", allow_single=True)
        if not answers:
            raise rec.error("answers", "is empty; there is no target to write")
        target_new, target_field = answers[0], "answers" if isinstance(record["answers"], str) else "answers[0]"
    else:
        target_new, target_field = rec.text("alt"), "alt"
    if not subject.strip():
        raise rec.error("subject", "is empty")
    prompt = _template(src, subject)
    if prompt is None:
        raise rec.error("subject", f"{subject!r} does not occur in src {src!r}")
    loc = [_loc_prompt(q) for q in rec.texts("loc", allow_single=True)]
    loc_ans = [a.strip() for a in rec.texts("loc_ans", allow_single=True)]
    if len(loc) != len(loc_ans):
        raise rec.error("loc_ans", f"has {len(loc_ans)} answers for {len(loc)} loc questions")
    if rec.has("case_id"):
        case_id: Union[int, str] = rec.identifier("case_id")
        id_field = "case_id"
    elif rec.has("id"):
        case_id, id_field = rec.identifier("id"), "id"
    else:
        case_id, id_field = index, "case_id"
    fields = {
        "prompt": "src",
        "subject": "subject",
        "target_new": target_field,
        "paraphrase_prompts": "rephrase",
        "neighborhood_prompts": "loc",
        "neighborhood_targets": "loc_ans",
        "case_id": id_field,
    }
    return rec.build(
        fields,
        prompt=prompt,
        subject=subject,
        target_new=target_new.strip(),
        target_true=None,
        paraphrase_prompts=rec.texts("rephrase", allow_single=True),
        neighborhood_prompts=loc,
        neighborhood_targets=loc_ans,
        case_id=case_id,
    )


def read_zsre(
    source: Union[str, Path, Any], target: str = "answers", limit: Optional[int] = None, offset: int = 0,
    allow_http: bool = False, revision: Optional[str] = None,
) -> list[EditRequest]:
    """Reads zsRE records ``offset .. offset + limit`` (MEND's split) as edit requests, in file order.

    Args:
        source: Local ``.json`` / ``.jsonl`` file, ``http(s)://`` URL, ``hub:<id>[:<config>][@<split>]``, or a
            ``datasets.Dataset`` (see :mod:`prune_lightning.data.sources`).
        target: Which field is the new target: ``"answers"`` (``answers[0]``, the ROME/MEMIT convention) or
            ``"alt"`` (the EasyEdit convention).
        limit: Maximum number of requests (``None``: all).
        offset: Number of records to skip first.
        allow_http: Accept a plain ``http://`` URL.
        revision: The revision (branch, tag or commit) of a hub dataset.

    Raises:
        RecordError: for the first malformed record, naming the file, the record's index and the field.
        SourceError: if the file is not JSON (or a JSON line is broken) or the hub dataset cannot be loaded.
    """
    _check_target(target)
    name, records = read_records(source, offset=offset, limit=limit, allow_http=allow_http, revision=revision)
    return [zsre_request(record, name, offset + i, target=target) for i, record in enumerate(records)]
