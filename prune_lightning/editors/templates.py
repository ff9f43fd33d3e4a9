r"""Context templates, fact tokens and prompts: how a request's prompt is dressed and where its fact is read.

ROME, MEMIT and AlphaEdit read the key and fit the value of a request over several versions of its prompt: the plain
prompt and the prompt behind short texts sampled from the model (*context templates*, ``"I like it. {}"``), so that
neither depends on one exact wording. This module makes the templates, groups them, renders a templated prompt and
finds its *fact token*; :mod:`.value` computes keys and values over them. The conventions follow the authors' code
(``kmeng01/rome`` ``rome/rome_main.py``, ``rome/repr_tools.py``; ``kmeng01/memit`` ``memit/memit_main.py``,
``memit/compute_ks.py``; EasyEdit for LLaMA).

Templates (``rome_main.get_context_templates``, ``memit_main.get_context_templates``). The plain ``"{}"`` comes
first, then texts sampled from the model with top-5 sampling, each followed by ``". {}"``. A ``(length, count)``
pair asks for ``count`` texts of ``length`` tokens *in all*, the opening prompt included (the reference's
``max_out_len``). ROME's GPT-2 code opens every text with the end-of-text token (``prompts="eos"``); MEMIT's code,
and EasyEdit's ROME and MEMIT, open them with "The", "Therefore", "Because", "I", "You" in turn
(``prompts="prefixes"``). Texts are NFKD-normalised, blank lines become spaces and braces become spaces.

Template groups (``compute_ks.py``). MEMIT averages a key within each group of templates first - the plain prompt
alone, the generated texts together - and then over the groups, so the plain prompt weighs as much as all the
generated ones together. ROME (``compute_u.py``) averages over all its templates at once: one group.

Fact tokens (``repr_tools.py``). ``"subject_last"`` is the last token of the subject in the tokenized text (counted
with any BOS token the tokenizer adds, as EasyEdit counts it). ``"last"`` is the prompt's last token, before the
target's tokens: EasyEdit's fix of ROME's ``-1``, which in a right-padded batch can point at padding.
"""

from __future__ import annotations

import unicodedata
from typing import Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.editors.base import Editor
from prune_lightning.models import eval_mode, model_device

__all__ = [
    "FACT_TOKENS",
    "TEMPLATE_PROMPTS",
    "TemplatedEditor",
    "check_template",
    "check_templates",
    "encode",
    "generate_context_templates",
    "render",
    "template_groups",
    "template_overhead",
]

FACT_TOKENS = ("subject_last", "last")
TEMPLATE_PROMPTS = ("eos", "prefixes")
# Openings of the generated context templates with prompts="prefixes" (cycled through).
_TEMPLATE_PREFIXES = ("The", "Therefore", "Because", "I", "You")
_TEMPLATE_TOP_K = 5

Templates = Union[Sequence[str], Sequence[Sequence[str]]]


# --------------------------------------------------------------------------------------------------------------------
# templates and tokens
# --------------------------------------------------------------------------------------------------------------------


def check_template(template: str) -> str:
    """``template`` itself, if it holds exactly one ``{}`` where the prompt goes; else a ``ValueError``."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"A context template needs exactly one '{{}}' where the prompt goes, got {template!r}")
    return template


def check_templates(templates: Templates) -> list[list[str]]:
    """Context templates as groups: a list of lists of templates (each checked), none of them empty.

    Args:
        templates: A flat list of templates (one group) or a list of groups.
    """
    if isinstance(templates, str) or not templates:
        raise ValueError(f"context templates must be a non-empty list (of templates, or of groups), got {templates!r}")
    if all(isinstance(t, str) for t in templates):
        groups = [list(templates)]
    else:
        groups = [[t] if isinstance(t, str) else list(t) for t in templates]
    for group in groups:
        if not group:
            raise ValueError(f"context templates hold an empty group: {templates!r}")
        for template in group:
            check_template(template)
    return groups


def template_groups(templates: Templates, plain_alone: bool) -> list[list[str]]:
    """The groups a key is averaged over (see the module docstring).

    Args:
        templates: A flat list of templates, or explicit groups (a list of lists), kept as given.
        plain_alone: For a flat list: put the plain ``"{}"`` in a group of its own and the other templates in
            another, as MEMIT's reference groups its templates; otherwise one group of all of them (ROME).
    """
    groups = check_templates(templates)
    nested = not all(isinstance(t, str) for t in templates)
    if nested or not plain_alone:
        return groups
    flat = groups[0]
    plain = [t for t in flat if t == "{}"]
    rest = [t for t in flat if t != "{}"]
    return [g for g in (plain, rest) if g]


def template_overhead(tokenizer, templates: Optional[Sequence[str]], lengths: Sequence[tuple[int, int]]) -> int:
    """Tokens the longest context template adds to a prompt: counted for known templates; before they are generated,
    their length in all plus two (``". "``), which a re-encoded sampled text may exceed by a little.

    Args:
        tokenizer: The model's tokenizer.
        templates: The templates, if known (given, or generated in ``setup``).
        lengths: The ``(length, count)`` pairs they will be generated with.
    """
    if templates:
        return max(len(tokenizer(t.replace("{}", ""), add_special_tokens=False)["input_ids"]) for t in templates)
    return max((int(length) + 2 for length, count in lengths if count), default=0)


def render(template: str, prompt: str, subject: str) -> tuple[str, int]:
    """``template.format(prompt.format(subject))`` and the character offset just past the subject in it."""
    marked_prompt = prompt.format("\0")
    subject_start = marked_prompt.index("\0")
    rendered = marked_prompt.replace("\0", subject)
    marked = template.format("\0")
    prompt_start = marked.index("\0")
    text = marked.replace("\0", rendered)
    return text, prompt_start + subject_start + len(subject)


def encode(tokenizer, template: str, prompt: str, subject: str, fact_token: str) -> tuple[list[int], int]:
    """Token ids of ``template`` around the rendered ``prompt``, and the index of the fact token in them.

    Args:
        tokenizer: The model's tokenizer.
        template: A context template with one ``{}``.
        prompt: The request's prompt with one ``{}`` for the subject.
        subject: The subject.
        fact_token: ``"subject_last"`` (the subject's last token) or ``"last"`` (the text's last token).
    """
    if fact_token not in FACT_TOKENS:
        raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
    text, subject_end = render(template, prompt, subject)
    ids = list(tokenizer(text)["input_ids"])
    if fact_token == "last":
        return ids, len(ids) - 1
    prefix = tokenizer(text[:subject_end])["input_ids"]
    return ids, min(len(prefix), len(ids)) - 1


def generate_context_templates(
    model: nn.Module, tokenizer, lengths: Sequence[tuple[int, int]], seed: int = 0, prompts: str = "prefixes"
) -> list[str]:
    """``"<text>. {}"`` for texts sampled from the model with seeded top-5 sampling (the plain ``"{}"`` not included).

    Args:
        model: The model the texts are sampled from.
        tokenizer: Its tokenizer.
        lengths: ``(length, count)`` pairs: ``count`` texts of ``length`` tokens in all, opening included.
        seed: Seed of a CPU ``torch.Generator``: the templates depend only on the model, the tokenizer and the seed.
        prompts: ``"eos"``: every text opens with the end-of-text token (ROME's GPT-2 code); ``"prefixes"``: the
            openings cycle through "The", "Therefore", "Because", "I", "You" (MEMIT's code, EasyEdit).
    """
    if prompts not in TEMPLATE_PROMPTS:
        raise ValueError(f"template prompts must be one of {TEMPLATE_PROMPTS}, got {prompts!r}")
    if prompts == "eos":
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("The tokenizer has no end-of-text token to open the context templates with; use "
                             "template_prompts='prefixes'")
        openings = [[int(eos)]]
    else:
        openings = [list(tokenizer(prefix)["input_ids"]) for prefix in _TEMPLATE_PREFIXES]
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    templates: list[str] = []
    with eval_mode(model), torch.no_grad():
        for length, count in lengths:
            for p, opening in enumerate(openings):
                n = len(range(p, count, len(openings)))
                if n == 0:
                    continue
                ids = torch.tensor([opening] * n, device=device)
                for _ in range(max(int(length) - len(opening), 0)):
                    logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
                    top = torch.topk(logits, k=min(_TEMPLATE_TOP_K, logits.shape[-1]), dim=-1)
                    probs = torch.softmax(top.values, dim=-1).cpu()
                    choice = torch.multinomial(probs, 1, generator=generator)
                    ids = torch.cat([ids, top.indices.cpu().gather(1, choice).to(device)], dim=1)
                for row in ids.tolist():
                    text = unicodedata.normalize("NFKD", tokenizer.decode(row, skip_special_tokens=True))
                    templates.append(text.replace("\n\n", " ").replace("{", " ").replace("}", " ") + ". {}")
    return templates


class TemplatedEditor(Editor):
    """Base of the editors that read keys and fit values through context templates (ROME, MEMIT, AlphaEdit).

    Subclasses keep the constructor's ``context_templates`` as ``_given_templates`` and set ``context_templates``
    (flat) in ``setup``; ``context_template_lengths`` are the ``(length, count)`` pairs of generated ones.
    """

    _given_templates: Optional[Templates] = None
    context_templates: Optional[list[str]] = None
    context_template_lengths: tuple = ()

    def settings(self) -> dict:
        """The constructor's arguments; ``context_templates`` as given (the generated ones follow from the seed)."""
        return {**super().settings(), "context_templates": self._given_templates}

    def prompt_overhead(self, tokenizer) -> int:
        """Tokens the longest context template puts before a prompt (for checking prompt lengths before a run).

        Args:
            tokenizer: The model's tokenizer.
        """
        templates = self.context_templates if self.context_templates is not None else self._given_templates
        if templates is not None and not all(isinstance(t, str) for t in templates):
            templates = [t for group in templates for t in ([group] if isinstance(group, str) else group)]
        return template_overhead(tokenizer, templates, self.context_template_lengths)
