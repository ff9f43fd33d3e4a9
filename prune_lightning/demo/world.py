"""A synthetic fact world: made-up people, a few relations, and the texts a tiny language model learns from.

The embedded default of prune-lightning edits a tiny GPT-2 that *knows* facts, offline, in minutes. Those facts
come from this module: :meth:`World.generate` draws, from one seed,

- a few hundred **entities** - made-up, pronounceable, unique person names (``"Tamo Rivek"``), each a few BPE
  tokens;
- one object per (entity, relation) for a handful of **relations** (:data:`RELATIONS`: where a person lives, the
  language they speak, their occupation, where they were born), each relation with a range of 12 single-word
  objects. Objects are dealt out evenly (every object of a relation belongs to about as many people), so a model
  cannot beat chance on "true object vs. another object of the relation" from object frequencies alone. There is
  exactly one object per (subject, relation): no contradictory facts;
- material for **general-ability tasks** that do not depend on any fact of the world: small additions
  (``"8 + 7 = 15"``), true/false entailment pairs about colours of things (``"The cup is red. Claim: The cup is
  blue. True or False? False"``) and a copy task (``"Repeat: sun cat tree => sun cat tree"``).

Every relation has three phrasings (templates). Each template ends right before the object, so that the template
with the subject filled in *is* a prompt whose next word is the object: ``"{} lives in"``, ``"The home of {} is
in"``, ``"{} has a house in"``. The first template is the one edits are requested on; the other two are the
paraphrases. The model learns from every fact in every phrasing (:meth:`World.training_texts`).

Edit requests (:meth:`World.counterfact_records`) are written in the CounterFact schema, so they go through the same
reader as the real data (:func:`prune_lightning.data.read_counterfact`):

- each request rewrites one fact of a distinct subject (while there are subjects left) to another object of the
  same relation's range;
- ``paraphrase_prompts``: the subject in the relation's other two templates;
- ``neighborhood_prompts``: up to ten *other* subjects whose true object for the relation equals the request's
  ``target_true`` (CounterFact's definition: the edit must leave them alone), in the relation's templates in turn.
  Subjects that no request of the file edits come first, then subjects edited only in other relations; a subject
  edited in the same relation is never a neighbour. Only when no other subject shares the object (tiny worlds) are
  other subjects of the same relation used;
- ``attribute_prompts``: subjects whose true object is the request's ``target_new``;
- ``generation_prompts``: the subject in the relation's templates.

The task files of the general-ability evaluation (:meth:`World.write_tasks`) are read by the tasks registered in
:mod:`prune_lightning.demo.tasks`. The examples are drawn from the same pools the model is trained on: the tasks
measure what edits take away from abilities the unedited model has, not generalisation to unseen inputs.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from prune_lightning.io import atomic_target

__all__ = ["Fact", "RELATIONS", "Relation", "World", "write_atomic"]

WORLD_VERSION = 1  # bump when the generator changes what a seed produces (it is part of cache keys)


@dataclass(frozen=True)
class Relation:
    """A relation of the world.

    Args:
        relation_id: A Wikidata-style id (``"P551"``), written into CounterFact records.
        name: A short name (``"residence"``).
        templates: Phrasings with one ``{}`` for the subject, each ending right before the object. The first is the
            prompt edits are requested on, the others are its paraphrases.
        objects: The relation's range: single words.
    """

    relation_id: str
    name: str
    templates: tuple[str, ...]
    objects: tuple[str, ...]

    def prompt(self, subject: str, template: int = 0) -> str:
        """The ``template``-th phrasing with ``subject`` filled in, e.g. ``"Tamo Rivek lives in"``."""
        return self.templates[template % len(self.templates)].format(subject)


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P551",
        "residence",
        ("{} lives in", "The home of {} is in", "{} has a house in"),
        ("Paris", "Oslo", "Rome", "Berlin", "Madrid", "Vienna", "Dublin", "Prague", "Lisbon", "Athens", "Warsaw",
         "Helsinki"),
    ),
    Relation(
        "P1412",
        "language",
        ("{} speaks", "The language of {} is", "{} is fluent in"),
        ("English", "French", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek", "Swedish", "Finnish",
         "Czech", "Turkish"),
    ),
    Relation(
        "P106",
        "occupation",
        ("{} works as a", "{} is employed as a", "By profession, {} is a"),
        ("baker", "farmer", "teacher", "painter", "doctor", "lawyer", "pilot", "nurse", "singer", "writer", "tailor",
         "sailor"),
    ),
    Relation(
        "P19",
        "birthplace",
        ("{} was born in", "The birthplace of {} is", "{} comes from the town of"),
        ("Tokyo", "Cairo", "Lima", "Delhi", "Seoul", "Sydney", "Toronto", "Nairobi", "Santiago", "Manila", "Bogota",
         "Hanoi"),
    ),
)

# Name parts: consonant-vowel syllables with an optional closing consonant read as made-up but pronounceable names.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s", "k")

# General-ability material: words that are neither names nor objects of the world.
_THINGS = ("cup", "box", "ball", "hat", "lamp", "door", "chair", "kite", "book", "bag", "car", "bed")
_COLOURS = ("red", "blue", "green", "black", "white", "yellow", "brown", "pink")
_COPY_WORDS = ("sun", "cat", "tree", "dog", "moon", "fish", "star", "rain", "bird", "road", "milk", "leaf", "rock",
               "sand", "wind", "fire")

ENTAILMENT_TEMPLATE = "{sentence1} Claim: {sentence2} True or False?"
COPY_TEMPLATE = "Repeat: {text} =>"
ARITHMETIC_TEMPLATE = "{question} ="


@dataclass(frozen=True)
class Fact:
    """One fact of the world: ``subject`` has ``object`` for the relation ``relation_id``."""

    subject: str
    relation_id: str
    object: str


def write_atomic(path: Union[str, Path], text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary sibling and a rename: never a half-written file.

    Args:
        path: The file to write; its folder is created.
        text: The content (UTF-8).
    """
    path = Path(path)
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@dataclass(frozen=True)
class World:
    """A generated world; make one with :meth:`World.generate` (the same arguments always give the same world).

    Args:
        seed: The generator's seed.
        entities: The subjects' names, unique.
        relations: The relations.
        objects: ``{(subject, relation_id): object}`` for every subject and relation.
        additions: ``(a, b)`` pairs of the arithmetic material.
        entailment: Records ``{"sentence1", "sentence2", "label"}`` (``entailment`` / ``not_entailment``).
        copies: Word sequences of the copy task, e.g. ``"sun cat tree"``.
        settings: The arguments of :meth:`generate` (JSON-serialisable; part of cache keys).
    """

    seed: int
    entities: tuple[str, ...]
    relations: tuple[Relation, ...]
    objects: dict[tuple[str, str], str] = field(repr=False)
    additions: tuple[tuple[int, int], ...] = field(repr=False)
    entailment: tuple[dict, ...] = field(repr=False)
    copies: tuple[str, ...] = field(repr=False)
    settings: dict = field(repr=False, compare=False)

    # ----------------------------------------------------------------------------------------------------------------
    # generation
    # ----------------------------------------------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        n_entities: int = 300,
        relations: Optional[Sequence[Relation]] = None,
        max_operand: int = 10,
        n_entailment: int = 300,
        n_copy: int = 200,
        general_repeats: int = 3,
    ) -> "World":
        """Draws a world from ``seed``.

        Args:
            seed: Seed of the generator; the same arguments give the same world.
            n_entities: Number of subjects (made-up person names).
            relations: The relations (default :data:`RELATIONS`).
            max_operand: Additions ``a + b`` for all ``0 <= a, b <= max_operand``.
            n_entailment: Number of entailment pairs (half true, half false).
            n_copy: Number of copy-task sequences (2 to 4 words).
            general_repeats: How often each general-ability text appears in :meth:`training_texts`; a fact appears
                once per phrasing (three times), so the default lets the model see both equally often.

        Raises:
            ValueError: For a non-positive size or a relation without objects or templates.
        """
        relations = tuple(RELATIONS if relations is None else relations)
        sizes = (("n_entities", n_entities), ("n_entailment", n_entailment), ("n_copy", n_copy),
                 ("general_repeats", general_repeats))
        for name, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 1:
            raise ValueError(f"max_operand must be an int >= 1, got {max_operand!r}")
        if not relations:
            raise ValueError("a world needs at least one relation")
        for rel in relations:
            if len(rel.objects) < 2 or len(set(rel.objects)) != len(rel.objects):
                raise ValueError(f"relation {rel.relation_id} needs at least two distinct objects, got {rel.objects}")
            if not rel.templates or any(t.count("{}") != 1 or t.endswith(" ") for t in rel.templates):
                raise ValueError(
                    f"relation {rel.relation_id}: every template needs exactly one '{{}}' and must end right before "
                    f"the object (no trailing space), got {rel.templates}"
                )
        if len({r.relation_id for r in relations}) != len(relations):
            raise ValueError(f"relation ids must be unique, got {[r.relation_id for r in relations]}")

        rng = random.Random(f"prune-lightning-world-{WORLD_VERSION}-{seed}")
        entities = _names(rng, n_entities)
        objects: dict[tuple[str, str], str] = {}
        for rel in relations:
            # deal the objects out evenly, then shuffle who gets which
            dealt = [rel.objects[i % len(rel.objects)] for i in range(n_entities)]
            rng.shuffle(dealt)
            for subject, obj in zip(entities, dealt):
                objects[(subject, rel.relation_id)] = obj
        additions = tuple((a, b) for a in range(max_operand + 1) for b in range(max_operand + 1))
        settings = dict(
            version=WORLD_VERSION,
            seed=seed,
            n_entities=n_entities,
            relations=[asdict(r) for r in relations],
            max_operand=max_operand,
            n_entailment=n_entailment,
            n_copy=n_copy,
            general_repeats=general_repeats,
        )
        return cls(
            seed=seed,
            entities=entities,
            relations=relations,
            objects=objects,
            additions=additions,
            entailment=tuple(_entailment_pairs(rng, n_entailment)),
            copies=tuple(_copy_sequences(rng, n_copy)),
            settings=settings,
        )

    def __repr__(self) -> str:
        relations = ", ".join(r.relation_id for r in self.relations)
        return f"World(seed={self.seed}, entities={len(self.entities)}, relations=[{relations}])"

    @classmethod
    def from_settings(cls, settings: dict) -> "World":
        """Re-generates the world that :attr:`settings` describe (as written into a demo checkpoint's world.json).

        Args:
            settings: The :attr:`settings` of a world.

        Raises:
            ValueError: If the settings come from another version of the generator.
        """
        settings = dict(settings)
        version = settings.pop("version", None)
        if version != WORLD_VERSION:
            raise ValueError(f"world settings of generator version {version!r}; this is version {WORLD_VERSION}")
        relations = [
            Relation(r["relation_id"], r["name"], tuple(r["templates"]), tuple(r["objects"]))
            for r in settings.pop("relations")
        ]
        return cls.generate(relations=relations, **settings)

    # ----------------------------------------------------------------------------------------------------------------
    # facts and texts
    # ----------------------------------------------------------------------------------------------------------------

    def relation(self, relation_id: str) -> Relation:
        """The relation with this id."""
        for rel in self.relations:
            if rel.relation_id == relation_id:
                return rel
        raise ValueError(f"unknown relation {relation_id!r}; the world has {[r.relation_id for r in self.relations]}")

    def facts(self) -> list[Fact]:
        """Every fact, subject by subject in the order of :attr:`entities`, relations in their order."""
        return [
            Fact(subject, rel.relation_id, self.objects[(subject, rel.relation_id)])
            for subject in self.entities
            for rel in self.relations
        ]

    def fact_text(self, fact: Fact, template: int = 0) -> str:
        """A training sentence: ``"Tamo Rivek lives in Oslo."``."""
        return f"{self.relation(fact.relation_id).prompt(fact.subject, template)} {fact.object}."

    def general_texts(self) -> list[str]:
        """The general-ability material as training sentences: additions, entailment pairs, copies."""
        texts = [f"{ARITHMETIC_TEMPLATE.format(question=f'{a} + {b}')} {a + b}" for a, b in self.additions]
        texts += [
            f"{ENTAILMENT_TEMPLATE.format(**r)} {'True' if r['label'] == 'entailment' else 'False'}"
            for r in self.entailment
        ]
        texts += [f"{COPY_TEMPLATE.format(text=t)} {t}" for t in self.copies]
        return texts

    def training_texts(self) -> list[str]:
        """Everything the model learns from: every fact in every phrasing, then :meth:`general_texts`, repeated
        ``general_repeats`` times (see :meth:`generate`)."""
        texts = [
            self.fact_text(fact, t)
            for fact in self.facts()
            for t in range(len(self.relation(fact.relation_id).templates))
        ]
        return texts + self.general_texts() * self.settings["general_repeats"]

    # ----------------------------------------------------------------------------------------------------------------
    # edit requests
    # ----------------------------------------------------------------------------------------------------------------

    def requested_facts(self, n_requests: int, seed: int = 0) -> list[tuple[Fact, str]]:
        """The facts that :meth:`counterfact_records` rewrites, with their new objects: ``[(fact, target_new)]``.

        Subjects are distinct while ``n_requests <= len(entities)``; relations go round in turn.

        Args:
            n_requests: Number of requests, at most ``len(entities) * len(relations)``.
            seed: Seed of the choice of subjects and new objects.
        """
        total = len(self.entities) * len(self.relations)
        if isinstance(n_requests, bool) or not isinstance(n_requests, int) or not 1 <= n_requests <= total:
            raise ValueError(f"n_requests must be an int in [1, {total}] for this world, got {n_requests!r}")
        rng = random.Random(f"prune-lightning-requests-{self.seed}-{seed}")
        subjects = list(self.entities)
        rng.shuffle(subjects)
        out: list[tuple[Fact, str]] = []
        n_rel = len(self.relations)
        for round_ in range(n_rel):
            for i, subject in enumerate(subjects):
                if len(out) == n_requests:
                    return out
                rel = self.relations[(i + round_) % n_rel]
                true = self.objects[(subject, rel.relation_id)]
                new = rng.choice([o for o in rel.objects if o != true])
                out.append((Fact(subject, rel.relation_id, true), new))
        return out

    def counterfact_records(self, n_requests: int, seed: int = 0, n_neighbors: int = 10) -> list[dict[str, Any]]:
        """Edit requests in the CounterFact schema (see the module docstring for what each prompt list holds).

        Args:
            n_requests: Number of requests.
            seed: Seed of the choice of subjects, new objects and neighbours.
            n_neighbors: Neighbourhood (and attribute) prompts per request, at most.

        Returns:
            A list of dicts that :func:`prune_lightning.data.read_counterfact` reads.
        """
        requests = self.requested_facts(n_requests, seed)
        edited_subjects = {fact.subject for fact, _ in requests}
        edited_pairs = {(fact.subject, fact.relation_id) for fact, _ in requests}
        ids = self.object_ids()
        rng = random.Random(f"prune-lightning-neighbors-{self.seed}-{seed}")
        by_object: dict[tuple[str, str], list[str]] = {}
        for (subject, rel_id), obj in self.objects.items():
            by_object.setdefault((rel_id, obj), []).append(subject)

        records = []
        for case_id, (fact, new) in enumerate(requests):
            rel = self.relation(fact.relation_id)
            same = [s for s in by_object[(rel.relation_id, fact.object)] if s != fact.subject]
            rng.shuffle(same)
            unedited = [s for s in same if s not in edited_subjects]
            edited_elsewhere = [s for s in same if s in edited_subjects and (s, rel.relation_id) not in edited_pairs]
            neighbors = (unedited + edited_elsewhere)[:n_neighbors]
            if not neighbors:  # a tiny world: nobody else shares the object
                others = [s for s in self.entities if s != fact.subject and (s, rel.relation_id) not in edited_pairs]
                others = others or [s for s in self.entities if s != fact.subject]
                neighbors = rng.sample(others, min(n_neighbors, len(others)))
            holders = [s for s in by_object[(rel.relation_id, new)] if s != fact.subject]
            rng.shuffle(holders)
            attributes = holders[:n_neighbors]
            records.append(
                {
                    "case_id": case_id,
                    "requested_rewrite": {
                        "prompt": rel.templates[0],
                        "relation_id": rel.relation_id,
                        "subject": fact.subject,
                        "target_new": {"str": new, "id": ids[new]},
                        "target_true": {"str": fact.object, "id": ids[fact.object]},
                    },
                    "paraphrase_prompts": [rel.prompt(fact.subject, t) for t in range(1, min(3, len(rel.templates)))]
                    or [rel.prompt(fact.subject, 0)],
                    "neighborhood_prompts": [rel.prompt(s, j) for j, s in enumerate(neighbors)],
                    "attribute_prompts": [rel.prompt(s, j) for j, s in enumerate(attributes)],
                    "generation_prompts": [rel.prompt(fact.subject, t) for t in range(len(rel.templates))],
                }
            )
        return records

    def object_ids(self) -> dict[str, str]:
        """A Wikidata-style id for every object of every relation: ``{"Oslo": "Q900001", ...}``."""
        ids: dict[str, str] = {}
        for rel in self.relations:
            for obj in rel.objects:
                ids.setdefault(obj, f"Q{900000 + len(ids)}")
        return ids

    def write_counterfact(self, path: Union[str, Path], n_requests: int, seed: int = 0) -> Path:
        """Writes :meth:`counterfact_records` as a JSON array (atomically) and returns the path.

        Args:
            path: The ``.json`` file to write.
            n_requests: Number of requests.
            seed: Seed of the requests.
        """
        return write_atomic(path, json.dumps(self.counterfact_records(n_requests, seed), indent=1) + "\n")

    # ----------------------------------------------------------------------------------------------------------------
    # general-ability tasks
    # ----------------------------------------------------------------------------------------------------------------

    def task_records(
        self, n_per_task: int = 100, seed: int = 0, n_requests: Optional[int] = None, request_seed: int = 0
    ) -> dict[str, list[dict]]:
        """The records of the demo tasks, by file stem: ``arithmetic``, ``entailment``, ``copy``, ``facts``.

        Args:
            n_per_task: Records per task (fewer where a pool is smaller).
            seed: Seed of the sampling.
            n_requests: If given, ``facts`` leaves out every subject that the first ``n_requests`` requests
                (:meth:`requested_facts` with ``request_seed``) edit, so it measures unedited knowledge.
            request_seed: The requests' seed.
        """
        if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
            raise ValueError(f"n_per_task must be an int >= 1, got {n_per_task!r}")
        rng = random.Random(f"prune-lightning-tasks-{self.seed}-{seed}")

        def sample(pool: Sequence[Any]) -> list[Any]:
            return rng.sample(list(pool), min(n_per_task, len(pool)))

        edited = set()
        if n_requests is not None:
            edited = {fact.subject for fact, _ in self.requested_facts(n_requests, request_seed)}
        unedited = [f for f in self.facts() if f.subject not in edited]
        return {
            "arithmetic": [{"question": f"{a} + {b}", "answer": str(a + b)} for a, b in sample(self.additions)],
            "entailment": [dict(r) for r in sample(self.entailment)],
            "copy": [{"text": t} for t in sample(self.copies)],
            "facts": [
                {"prompt": self.relation(f.relation_id).prompt(f.subject, 0), "answer": f.object, "subject": f.subject}
                for f in sample(unedited)
            ],
        }

    def write_tasks(
        self,
        directory: Union[str, Path],
        n_per_task: int = 100,
        seed: int = 0,
        n_requests: Optional[int] = None,
        request_seed: int = 0,
    ) -> dict[str, Path]:
        """Writes one JSON-lines file per demo task into ``directory`` (atomically).

        The files are read by ``load_task("demo-<stem>", path)`` once :mod:`prune_lightning.demo` is imported.

        Args:
            directory: The folder (created if missing).
            n_per_task: Records per task.
            seed: Seed of the sampling.
            n_requests: Leave the subjects of this many requests out of ``facts`` (see :meth:`task_records`).
            request_seed: The requests' seed.

        Returns:
            ``{"demo-arithmetic": <directory>/arithmetic.jsonl, ...}``.
        """
        directory = Path(directory)
        records = self.task_records(n_per_task, seed, n_requests, request_seed)
        return {
            f"demo-{stem}": write_atomic(directory / f"{stem}.jsonl", _jsonl(rows)) for stem, rows in records.items()
        }


# --------------------------------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------------------------------


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS)


def _names(rng: random.Random, n: int) -> tuple[str, ...]:
    """``n`` unique names ``"First Last"``: two syllables each, the last with an optional closing consonant."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        first = (_syllable(rng) + _syllable(rng) + rng.choice(_CODAS)).capitalize()
        last = (_syllable(rng) + _syllable(rng) + rng.choice(_CODAS)).capitalize()
        name = f"{first} {last}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return tuple(names)


def _entailment_pairs(rng: random.Random, n: int) -> list[dict]:
    """``"The cup is red."`` entails ``"The cup is red."`` but not ``"The cup is blue."``; half of each, alternating.

    One rule - the claim repeats the premise's colour - that a tiny model can learn (as it learns to copy), rather
    than pairs it could only memorise one by one.
    """
    out = []
    for i in range(n):
        label = "entailment" if i % 2 == 0 else "not_entailment"
        thing, colour = rng.choice(_THINGS), rng.choice(_COLOURS)
        claim = colour if label == "entailment" else rng.choice([c for c in _COLOURS if c != colour])
        out.append({"sentence1": f"The {thing} is {colour}.", "sentence2": f"The {thing} is {claim}.", "label": label})
    return out


def _copy_sequences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(_COPY_WORDS) for _ in range(rng.randint(2, 4))) for _ in range(n)]
