"""Reader for CounterFact (Meng et al., ROME, 2022): counterfactual rewrites of Wikidata facts.

One record of the released ``counterfact.json`` (and of its hub copies, e.g. ``hub:azhx/counterfact``)::

    {
      "case_id": 0,
      "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}
      },
      "paraphrase_prompts": ["... Danielle Darrieux's mother tongue is"],
      "neighborhood_prompts": ["The mother tongue of Léon Blum is", ...],
      "attribute_prompts": ["J. R. R. Tolkien is a native speaker of", ...],
      "generation_prompts": ["Danielle Darrieux's mother tongue is", ...]
    }

Mapping to :class:`~prune_lightning.data.EditRequest`: the rewrite's prompt/subject/targets become the request's;
the four prompt lists are copied as they are (they are complete prompts, subject written in). The neighborhood
prompts' expected answer is ``target_true`` (the neighbours share the old object), so ``neighborhood_targets``
stays empty. ``paraphrase_prompts`` and ``neighborhood_prompts`` are required; ``attribute_prompts``,
``generation_prompts`` and ``relation_id`` may be absent. Leading whitespace of the target strings is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from prune_lightning.data.requests import EditRequest, RecordFields
from prune_lightning.data.sources import read_records

__all__ = ["read_counterfact", "counterfact_request"]

_FIELDS = {
    "prompt": "requested_rewrite.prompt",
    "subject": "requested_rewrite.subject",
    "target_new": "requested_rewrite.target_new.str",
    "target_true": "requested_rewrite.target_true.str",
    "relation_id": "requested_rewrite.relation_id",
    "case_id": "case_id",
    "paraphrase_prompts": "paraphrase_prompts",
    "neighborhood_prompts": "neighborhood_prompts",
    "attribute_prompts": "attribute_prompts",
    "generation_prompts": "generation_prompts",
}


def counterfact_request(record: Any, name: str = "<record>", index: int = 0) -> EditRequest:
    """Turns one CounterFact record into an :class:`EditRequest`.

    Args:
        record: The record (a dict in the CounterFact schema).
        name: The file it comes from, for error messages.
        index: Its index in that file, for error messages.

    Raises:
        RecordError: naming ``name``, ``index`` and the dotted field that is missing, mistyped or invalid.
    """
    rec = RecordFields(record, name, index)
    return rec.build(
        _FIELDS,
        case_id=rec.identifier("case_id"),
        prompt=rec.text(_FIELDS["prompt"]),
        subject=rec.text(_FIELDS["subject"]),
        target_new=rec.text(_FIELDS["target_new"]).lstrip(),
        target_true=rec.text(_FIELDS["target_true"]).lstrip(),
        relation_id=rec.text(_FIELDS["relation_id"], optional=True),
        paraphrase_prompts=rec.texts("paraphrase_prompts"),
        neighborhood_prompts=rec.texts("neighborhood_prompts"),
        attribute_prompts=rec.texts("attribute_prompts", optional=True),
        generation_prompts=rec.texts("generation_prompts", optional=True),
    )


def read_counterfact(
    source: Union[str, Path, Any], limit: Optional[int] = None, offset: int = 0, allow_http: bool = False,
    revision: Optional[str] = None,
) -> list[EditRequest]:
    """Reads CounterFact records ``offset .. offset + limit`` as edit requests, in file order.

    Args:
        source: Local ``.json`` / ``.jsonl`` file, ``http(s)://`` URL, ``hub:<id>[:<config>][@<split>]``, or a
            ``datasets.Dataset`` (see :mod:`prune_lightning.data.sources`).
        limit: Maximum number of requests (``None``: all).
        offset: Number of records to skip first.
        allow_http: Accept a plain ``http://`` URL.
        revision: The revision (branch, tag or commit) of a hub dataset.

    Raises:
        RecordError: for the first malformed record, naming the file, the record's index and the field.
        SourceError: if the file is not JSON (or a JSON line is broken) or the hub dataset cannot be loaded.
    """
    name, records = read_records(source, offset=offset, limit=limit, allow_http=allow_http, revision=revision)
    return [counterfact_request(record, name, offset + i) for i, record in enumerate(records)]
