"""The unit of work of sequential editing: one fact to write into a model, and the prompts that test it.

An :class:`EditRequest` says "make ``prompt.format(subject)`` continue with ``target_new``". The prompt is a
template with exactly one ``{}`` where the subject goes, because editors such as ROME and MEMIT need to find the
subject's last token inside the rendered prompt. Targets are stored without a leading space; an editor that
tokenizes a continuation prepends ``" "`` itself.

Beside the rewrite, a request carries the prompts used to judge it (CounterFact's and zsRE's protocol):

- ``paraphrase_prompts``: complete prompts (subject already written in) that should now also yield
  ``target_new`` - generalization.
- ``neighborhood_prompts``: complete prompts about *other* subjects that must keep their answer - locality.
  In CounterFact that answer is ``target_true`` (the neighbours share the relation and the old object), so
  ``neighborhood_targets`` is empty; in zsRE each locality question has its own answer, given in
  ``neighborhood_targets`` (one per prompt).
- ``attribute_prompts`` / ``generation_prompts``: CounterFact's extra prompts, kept for evaluators that use them.

Requests are validated on construction and raise :class:`EditRequestError` (a ``ValueError``) naming the field.
Readers turn such a problem, or a missing or mistyped key, into one :class:`RecordError` naming the file, the
record's index and the record's own (dotted) field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

__all__ = ["EditRequest", "EditRequestError", "RecordError", "RecordFields"]

_TUPLE_FIELDS = (
    "paraphrase_prompts",
    "neighborhood_prompts",
    "neighborhood_targets",
    "attribute_prompts",
    "generation_prompts",
)


class EditRequestError(ValueError):
    """An :class:`EditRequest` field holds an invalid value.

    Args:
        field: Name of the offending :class:`EditRequest` field (``"prompt"``, ``"paraphrase_prompts[2]"``, ...).
        problem: What is wrong with it.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"EditRequest field '{field}': {problem}")


class RecordError(ValueError):
    """A record of a data file is malformed: a key is missing, has the wrong type, or holds an invalid value.

    The message reads ``"{path}: record {index}: field '{field}': {problem}"``, e.g.
    ``"data/cf.json: record 3: field 'requested_rewrite.target_new.str': missing"``.

    Args:
        path: The file (or hub dataset) the record comes from.
        index: Position of the record in that file, counted from 0 (for JSON lines: among the non-blank lines).
        field: Dotted path of the offending key inside the record; ``None`` when the record as a whole is wrong.
        problem: What is wrong with it.
    """

    def __init__(self, path: Any, index: int, field: Optional[str], problem: str) -> None:
        self.path = str(path)
        self.index = index
        self.field = field
        self.problem = problem
        where = f"{self.path}: record {index}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the attributes across pickling (worker processes, ddp_spawn)
        return (type(self), (self.path, self.index, self.field, self.problem))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class EditRequest:
    """One edit: make ``prompt.format(subject)`` continue with ``target_new``.

    Lists are accepted for the prompt collections and stored as tuples, so a request is hashable and immutable.

    Args:
        prompt: Template with exactly one ``{}`` where the subject goes, e.g. ``"The mother tongue of {} is"``.
            Literal braces elsewhere must be doubled (``{{``), as for ``str.format``.
        subject: The entity whose fact changes, e.g. ``"Danielle Darrieux"``.
        target_new: The new object, without a leading space (editors prepend ``" "``), e.g. ``"English"``.
        target_true: The current (true) object, or ``None`` where the data has none (zsRE).
        paraphrase_prompts: Complete prompts (subject written in) that should also yield ``target_new``.
        neighborhood_prompts: Complete prompts about other subjects whose answers must not change.
        neighborhood_targets: The answer of each neighborhood prompt (zsRE); empty when that answer is
            ``target_true`` (CounterFact).
        case_id: Identifier of the request in its data set.
        relation_id: Wikidata relation id (``"P103"``) where known.
        attribute_prompts: CounterFact prompts about other subjects whose true object is ``target_new``.
        generation_prompts: CounterFact prompts for free generation about the subject.
        source: The file (or hub dataset) the request was read from, where known; not part of equality.
        index: Its record's index in ``source``, where known; not part of equality.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: Optional[str] = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_targets: tuple[str, ...] = ()
    case_id: Union[int, str] = 0
    relation_id: Optional[str] = None
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: Optional[str] = field(default=None, compare=False)
    index: Optional[int] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, _as_str_tuple(name, getattr(self, name)))
        _check_prompt(self.prompt)
        _check_text("subject", self.subject)
        _check_text("target_new", self.target_new)
        if self.target_true is not None:
            _check_text("target_true", self.target_true)
            if self.target_true.strip() == self.target_new.strip():
                raise EditRequestError(
                    "target_new", f"equals target_true ({self.target_true!r}): the edit would change nothing"
                )
        if isinstance(self.case_id, bool) or not isinstance(self.case_id, (int, str)):
            raise EditRequestError("case_id", f"expected an int or a string, got {_type_name(self.case_id)}")
        if self.relation_id is not None and not isinstance(self.relation_id, str):
            raise EditRequestError("relation_id", f"expected a string or None, got {_type_name(self.relation_id)}")
        if self.neighborhood_targets and len(self.neighborhood_targets) != len(self.neighborhood_prompts):
            raise EditRequestError(
                "neighborhood_targets",
                f"has {len(self.neighborhood_targets)} entries but neighborhood_prompts has "
                f"{len(self.neighborhood_prompts)}; give one target per prompt, or none",
            )

    @property
    def where(self) -> str:
        """Where the request comes from, for messages: ``"data/cf.json: record 3 (case_id 7)"``."""
        place = f"{self.source}: record {self.index}" if self.source is not None and self.index is not None else (
            self.source or "a request given in code")
        return f"{place} (case_id {self.case_id!r})"

    @property
    def rendered_prompt(self) -> str:
        """The prompt with the subject written in: ``prompt.format(subject)``."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serializable dict of all fields (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EditRequest":
        """Builds a request from the output of :meth:`to_dict`.

        Args:
            data: Field names to values; unknown keys are refused.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"EditRequest.from_dict: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise EditRequestError(name, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise EditRequestError(name, "is empty")
    if name.startswith("target") and value[0].isspace():
        raise EditRequestError(name, f"{value!r} starts with whitespace; store targets without it")


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise EditRequestError("prompt", f"expected a string, got {_type_name(prompt)}")
    count = prompt.count("{}")
    if count != 1:
        raise EditRequestError(
            "prompt", f"{prompt!r} must contain exactly one '{{}}' where the subject goes, found {count}"
        )
    try:
        prompt.format("subject")
    except (IndexError, KeyError, ValueError) as err:
        raise EditRequestError(
            "prompt", f"{prompt!r} is not a valid template ({err}); double literal braces as '{{{{' and '}}}}'"
        ) from None


def _as_str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise EditRequestError(name, f"expected a list of strings, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise EditRequestError(f"{name}[{i}]", f"expected a string, got {_type_name(item)}")
    return tuple(value)


# --------------------------------------------------------------------------------------------------------------------
# helpers shared by the readers: typed access to a record's dotted fields, errors naming file, index and field
# --------------------------------------------------------------------------------------------------------------------

_MISSING = object()


class RecordFields:
    """Typed access to the (dotted) fields of one record; every problem becomes a :class:`RecordError`.

    Args:
        record: The record as read (should be a mapping).
        name: The file or hub dataset it comes from.
        index: Its index in that source.
    """

    def __init__(self, record: Any, name: str, index: int) -> None:
        self.name = name
        self.index = index
        if not isinstance(record, Mapping):
            raise RecordError(name, index, None, f"expected an object with named fields, got {_type_name(record)}")
        self.record = record

    def error(self, field: Optional[str], problem: str) -> RecordError:
        return RecordError(self.name, self.index, field, problem)

    def has(self, dotted: str) -> bool:
        return self._lookup(dotted, required=False) is not _MISSING

    def _lookup(self, dotted: str, required: bool) -> Any:
        node: Any = self.record
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, Mapping):
                parent = ".".join(parts[:depth])
                raise self.error(parent, f"expected an object with field '{part}', got {_type_name(node)}")
            if part not in node:
                if required:
                    raise self.error(dotted, "missing")
                return _MISSING
            node = node[part]
        return node

    def text(self, dotted: str, optional: bool = False) -> Optional[str]:
        """A string field (``None`` if ``optional`` and absent or null)."""
        value = self._lookup(dotted, required=not optional)
        if value is _MISSING or (optional and value is None):
            return None
        if not isinstance(value, str):
            raise self.error(dotted, f"expected a string, got {_type_name(value)}")
        return value

    def texts(self, dotted: str, optional: bool = False, allow_single: bool = False) -> tuple[str, ...]:
        """A list-of-strings field (empty if ``optional`` and absent); ``allow_single`` also takes one string."""
        value = self._lookup(dotted, required=not optional)
        if value is _MISSING or (optional and value is None):
            return ()
        if allow_single and isinstance(value, str):
            return (value,)
        if not isinstance(value, (list, tuple)):
            kind = "a string or a list of strings" if allow_single else "a list of strings"
            raise self.error(dotted, f"expected {kind}, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{dotted}[{i}]", f"expected a string, got {_type_name(item)}")
        return tuple(value)

    def identifier(self, dotted: str) -> Union[int, str]:
        value = self._lookup(dotted, required=True)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(dotted, f"expected an int or a string, got {_type_name(value)}")
        return value

    def build(self, fields: Mapping[str, str], **kwargs: Any) -> EditRequest:
        """Builds an :class:`EditRequest`; a rejected value is reported under the record's own field name.

        Args:
            fields: EditRequest field name -> the record's dotted field it was read from.
            **kwargs: The EditRequest fields.
        """
        try:
            return EditRequest(**kwargs, source=str(self.name), index=self.index)
        except EditRequestError as err:
            base, bracket, rest = err.field.partition("[")
            field = fields.get(base, base)
            if bracket and isinstance(self._lookup(field, required=False), (list, tuple)):
                field += bracket + rest  # the entry of a list; a single string stands for the list as a whole
            raise self.error(field, err.problem) from None
