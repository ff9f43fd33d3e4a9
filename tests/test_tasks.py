"""Downstream task readers: small files of each schema, clear errors, and the paper's real files where present."""

import json
from pathlib import Path

import pytest

from prune_lightning.data.tasks import (
    TaskExample,
    TaskFieldError,
    TaskRecord,
    TaskRecordError,
    get_task,
    load_task,
    register_task,
    rte_label_from_generation,
    task_names,
)
from prune_lightning.metrics.text import ExactMatch, LabelAccuracy, NumberMatch, RougeMean

PAPER_TASKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper-tasks"

GSM8K_ROWS = [
    {"question": "Janet has 3 eggs and buys 2. How many?", "answer": "She has 3+2=<<3+2=5>>5 eggs.\n#### 5"},
    {"question": "A robe takes 2 bolts. How many in total?", "answer": "It takes 2/2=1\nSo 2+1=3\n#### 3"},
    {"question": "How much profit?", "answer": "He made 200,000-130,000=70,000\n#### 70000"},
]
SAMSUM_ROWS = [
    {"id": "13817023", "dialogue": "A: Hi Tom!\r\nB: Hi.", "summary": "A greets Tom. "},
    {"id": "13716628", "dialogue": "Emma: Hello\r\nRob: Bye", "summary": "Emma and Rob talk."},
]
NQ_ROWS = [
    {"question": "who got the first nobel prize in physics?", "answer": ["Wilhelm Conrad Röntgen"],
     "output": ["\n\nThe first Nobel Prize in Physics was awarded to Wilhelm Röntgen."]},
    {"question": "which mode is used for short wave broadcast service?", "answer": ["Olivia", "MFSK"],
     "output": ["\n\nShortwave radio is radio transmission using shortwave frequencies."]},
]
RTE_TSV = (
    "index\tsentence1\tsentence2\tlabel\n"
    "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\tnot_entailment\n"
    '1\t"Quoted," said Harper. The end.\tHarper spoke.\tentailment\n'
)


def write_jsonl(path: Path, rows, blank_after=None) -> Path:
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if blank_after == i:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# the four readers
# --------------------------------------------------------------------------------------------------------------------


def test_gsm8k_reader(tmp_path):
    examples = load_task("gsm8k", write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS))
    assert [e.references for e in examples] == [("5",), ("3",), ("70000",)]
    assert examples[0] == TaskExample(
        prompt="Q: Janet has 3 eggs and buys 2. How many? A:Let's think step by step. "
        "She has 3+2=<<3+2=5>>5 eggs. Therefore, the answer (arabic numerals) is:",
        references=("5",),
        task="gsm8k",
        index=0,
    )
    assert examples[1].prompt.endswith("It takes 2/2=1\nSo 2+1=3 Therefore, the answer (arabic numerals) is:")
    assert "####" not in examples[2].prompt
    assert [e.index for e in examples] == [0, 1, 2]
    spec = get_task("gsm8k")
    assert (spec.max_new_tokens, spec.metric, spec.default_size) == (5, "number_match", 358)
    assert isinstance(spec.make_metric(), NumberMatch)


def test_samsum_reader(tmp_path):
    path = tmp_path / "samsum.json"
    path.write_text(json.dumps(SAMSUM_ROWS, indent=2), encoding="utf-8")
    examples = load_task("samsum", path)
    assert examples[0].prompt == "A: Hi Tom!\r\nB: Hi.\nTL;DR:"  # turns kept as in the file
    assert examples[0].references == ("A greets Tom.",)
    assert examples[1].meta == {"id": "13716628"}
    spec = get_task("samsum")
    assert (spec.max_new_tokens, spec.default_size) == (25, 149)
    assert isinstance(spec.make_metric(), RougeMean)


def test_nq_reader(tmp_path):
    examples = load_task("nq", write_jsonl(tmp_path / "nq.jsonl", NQ_ROWS))
    assert examples[0].prompt == (
        "Refer to the passage below and answer the following question. Passage: The first Nobel Prize in Physics "
        "was awarded to Wilhelm Röntgen. Question: who got the first nobel prize in physics?. Answer:"
    )
    assert examples[1].references == ("Olivia", "MFSK")
    spec = get_task("nq")
    assert (spec.max_new_tokens, spec.default_size) == (20, 261)
    assert isinstance(spec.make_metric(), ExactMatch)


def test_rte_reader_and_label_mapping(tmp_path):
    path = tmp_path / "rte.tsv"
    path.write_text(RTE_TSV, encoding="utf-8")
    examples = load_task("rte", path)
    assert examples[0].prompt == (
        "No Weapons of Mass Destruction Found in Iraq Yet. entails the Weapons of Mass Destruction Found in Iraq.. "
        "True or False? answer:"
    )
    assert [e.references for e in examples] == [("not_entailment",), ("entailment",)]
    assert examples[1].prompt.startswith('"Quoted," said Harper.')  # quotes kept literally, as GLUE reads them
    spec = get_task("rte")
    assert (spec.max_new_tokens, spec.default_size) == (1, 299)
    metric = spec.make_metric()
    assert isinstance(metric, LabelAccuracy)
    metric.update([spec.prediction(" False"), spec.prediction(" maybe")], [e.references for e in examples])
    assert float(metric.compute()) == 0.5


@pytest.mark.parametrize(
    ("text", "label"),
    [("True", "entailment"), (" true.", "entailment"), ("TRUE, because", "entailment"), ("False", "not_entailment"),
     ("\nfalse!", "not_entailment"), ("yes", "invalid"), ("", "invalid"), ("untrue", "invalid"),
     ("Is it true", "invalid")],
)
def test_rte_label_from_generation(text, label):
    assert rte_label_from_generation(text) == label


def test_in_memory_records_and_glue_class_ids():
    rows = [
        {"sentence1": "A", "sentence2": "B", "label": 0, "idx": 7},
        {"sentence1": "C", "sentence2": "D", "label": 1},
    ]
    examples = load_task("rte", rows)
    assert [e.references for e in examples] == [("entailment",), ("not_entailment",)]
    assert examples[0].meta == {"index": 7}
    with pytest.raises(TaskRecordError, match=r"<records>: row 0: field 'label': class id -1 .*unlabelled"):
        load_task("rte", [{"sentence1": "A", "sentence2": "B", "label": -1}])


def test_datasets_dataset_source():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(GSM8K_ROWS)
    examples = load_task("gsm8k", ds, limit=2)
    assert [e.references for e in examples] == [("5",), ("3",)]


# --------------------------------------------------------------------------------------------------------------------
# limits and templates
# --------------------------------------------------------------------------------------------------------------------


def test_limit_semantics(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    assert len(load_task("gsm8k", path)) == 3  # default size 358 > 3 rows: all of them
    assert len(load_task("gsm8k", path, limit=2)) == 2
    assert len(load_task("gsm8k", path, limit=0)) == 3
    assert len(load_task("gsm8k", path, limit=-1)) == 3
    with pytest.raises(ValueError, match="limit must be .* got -2"):
        load_task("gsm8k", path, limit=-2)
    with pytest.raises(ValueError, match="limit must be .* got 1.5"):
        load_task("gsm8k", path, limit=1.5)


def test_limit_stops_before_later_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS[:2] + ['{"question": "broken'])
    assert len(load_task("gsm8k", path, limit=2)) == 2
    with pytest.raises(TaskRecordError, match="line 3: not valid JSON"):
        load_task("gsm8k", path, limit=-1)


def test_template_override(tmp_path):
    path = write_jsonl(tmp_path / "nq.jsonl", NQ_ROWS)
    examples = load_task("nq", path, template="Context: {passage}\nQ: {question}\nA:")
    assert examples[1].prompt == (
        "Context: Shortwave radio is radio transmission using shortwave frequencies.\n"
        "Q: which mode is used for short wave broadcast service?\nA:"
    )
    with pytest.raises(ValueError, match="refers to field 'context'; this task's records provide"):
        load_task("nq", path, template="{context} {question}")
    with pytest.raises(ValueError, match="positional field"):
        load_task("nq", path, template="{} {question}")


# --------------------------------------------------------------------------------------------------------------------
# malformed records: one clear error naming file, line (or element) and field
# --------------------------------------------------------------------------------------------------------------------


def test_jsonl_error_names_file_line_and_field(tmp_path):
    rows = [GSM8K_ROWS[0], {"question": "Q?", "answer": "no final number here"}]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows, blank_after=0)  # the bad row is on line 3
    with pytest.raises(TaskRecordError, match=r"gsm8k\.jsonl: line 3: field 'answer': no '####'") as info:
        load_task("gsm8k", path)
    assert (info.value.location, info.value.field) == ("line 3", "answer")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"answer": "x #### 5"}, "question", "missing"),
        ({"question": 5, "answer": "x #### 5"}, "question", "expected a string, got int"),
        ({"question": "Q?", "answer": "x #### five"}, "answer", "not a number: 'five'"),
        ({"question": "  ", "answer": "x #### 5"}, "question", "is empty"),
    ],
)
def test_gsm8k_field_errors(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "g.jsonl", [GSM8K_ROWS[0], row])
    with pytest.raises(TaskRecordError, match=rf"g\.jsonl: line 2: field '{field}': .*{problem}"):
        load_task("gsm8k", path)


def test_json_list_error_names_element_and_field(tmp_path):
    path = tmp_path / "samsum.json"
    path.write_text(json.dumps([SAMSUM_ROWS[0], {"id": "1", "dialogue": "A: hi"}]), encoding="utf-8")
    with pytest.raises(TaskRecordError, match=r"samsum\.json: element 1: field 'summary': missing"):
        load_task("samsum", path)
    path.write_text(json.dumps([SAMSUM_ROWS[0], ["not", "a", "dict"]]), encoding="utf-8")
    with pytest.raises(TaskRecordError, match=r"element 1: expected an object \(dict\), got list"):
        load_task("samsum", path)
    path.write_text('[{"id": "1",\n "dialogue": }]', encoding="utf-8")
    with pytest.raises(TaskRecordError, match=r"samsum\.json: line 2: not valid JSON"):
        load_task("samsum", path)


def test_nq_field_errors(tmp_path):
    bad = dict(NQ_ROWS[0], output="a passage, not a list")
    path = write_jsonl(tmp_path / "nq.jsonl", [NQ_ROWS[0], NQ_ROWS[1], {"question": "q?", "answer": ["a"]}])
    with pytest.raises(TaskRecordError, match=r"nq\.jsonl: line 3: field 'output': missing"):
        load_task("nq", path)
    path = write_jsonl(tmp_path / "nq2.jsonl", [dict(NQ_ROWS[0], answer=["ok", 3])])
    with pytest.raises(TaskRecordError, match=r"line 1: field 'answer\[1\]': expected a string, got int"):
        load_task("nq", path)
    path = write_jsonl(tmp_path / "nq3.jsonl", [dict(NQ_ROWS[0], answer=[])])
    with pytest.raises(TaskRecordError, match=r"line 1: field 'answer': is an empty list"):
        load_task("nq", path)
    # a lone string passage is accepted as a list of one
    assert load_task("nq", write_jsonl(tmp_path / "nq4.jsonl", [bad]))[0].prompt.count("a passage, not a list") == 1


def test_tsv_errors_name_line_and_field(tmp_path):
    path = tmp_path / "rte.tsv"
    path.write_text(RTE_TSV + "2\tS1.\tS2.\tmaybe\n", encoding="utf-8")
    with pytest.raises(TaskRecordError, match=r"rte\.tsv: line 4: field 'label': expected one of .* got 'maybe'"):
        load_task("rte", path)
    path.write_text(RTE_TSV + "2\tS1 without a second sentence\n", encoding="utf-8")
    with pytest.raises(TaskRecordError, match=r"rte\.tsv: line 4: field 'sentence2': missing \(the row has 2 of"):
        load_task("rte", path)
    path.write_text(RTE_TSV + "2\tS1.\tS2.\tentailment\textra\n", encoding="utf-8")
    with pytest.raises(TaskRecordError, match=r"line 4: has 5 columns but the header has 4"):
        load_task("rte", path)


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        load_task("gsm8k", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'; registered tasks: .*'gsm8k'"):
        load_task("mmlu", tmp_path)
    with pytest.raises(TypeError, match="a task source must be"):
        load_task("gsm8k", 42)


def test_hub_source_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"hub:no-such-owner/no-such-set:main@test.*could not load"):
        load_task("gsm8k", "no-such-owner/no-such-set:main")


# --------------------------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------------------------


def test_register_custom_task(tmp_path):
    def read_capital(record):
        if "country" not in record:
            raise TaskFieldError("country", "missing")
        return TaskRecord(fields={"country": record["country"]}, references=(record["capital"],), meta={})

    spec = register_task(
        "test-capitals", read_capital, "The capital of {country} is", 3, "span_exact_match", default_size=1,
        overwrite=True,
    )
    try:
        assert "test-capitals" in task_names()
        path = write_jsonl(tmp_path / "capitals.jsonl", [{"country": "France", "capital": "Paris"},
                                                         {"country": "Peru", "capital": "Lima"}])
        examples = load_task("test-capitals", path)
        assert len(examples) == 1 and examples[0].prompt == "The capital of France is"
        assert len(load_task("test-capitals", path, limit=-1)) == 2
        assert spec.prediction(" Paris") == " Paris"
        with pytest.raises(TaskRecordError, match=r"bad\.jsonl: line 1: field 'country': missing"):
            load_task("test-capitals", write_jsonl(tmp_path / "bad.jsonl", [{"capital": "Paris"}]))
        with pytest.raises(TaskRecordError, match=r"bad2\.jsonl: line 2: field 'capital': missing"):  # a KeyError
            load_task("test-capitals", write_jsonl(tmp_path / "bad2.jsonl", [{"country": "A", "capital": "B"},
                                                                             {"country": "Peru"}]), limit=-1)
        with pytest.raises(ValueError, match="already registered"):
            register_task("test-capitals", read_capital, "{country}", 3, "span_exact_match")
    finally:
        from prune_lightning.data import tasks

        tasks._TASKS.pop("test-capitals", None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
        (dict(metric="bleu"), "unknown metric 'bleu'"),
        (dict(default_template=""), "default_template must be a non-empty format string"),
        (dict(default_template="{question"), "not a valid format string"),
        (dict(default_size=0), "default_size must be None or an int >= 1, got 0"),
        (dict(reader="not callable"), "reader for task 'x' must be callable"),
    ],
)
def test_register_task_validates(kwargs, message):
    args = dict(name="x", reader=lambda r: None, default_template="{q}", max_new_tokens=1, metric="exact_match")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        register_task(**args)
    assert "x" not in task_names()


# --------------------------------------------------------------------------------------------------------------------
# the paper's files (read from ../shared, never copied into the repository)
# --------------------------------------------------------------------------------------------------------------------

REAL = [
    ("gsm8k", "test-reasoning.jsonl", 1319),
    ("samsum", "test-summarization.json", 818),
    ("nq", "test-OpenDomainQA.jsonl", 3610),
    ("rte", "test-NLI.tsv", 2489),
]


@pytest.mark.parametrize(("task", "filename", "rows"), REAL)
def test_real_files_parse_every_row(task, filename, rows):
    path = PAPER_TASKS / filename
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    everything = load_task(task, path, limit=-1)
    assert len(everything) == rows
    default = load_task(task, path)
    assert len(default) == get_task(task).default_size
    assert default == everything[: len(default)]
    assert all(e.prompt and e.references and all(r.strip() for r in e.references) for e in everything)


def test_real_files_first_examples():
    if not PAPER_TASKS.is_dir():
        pytest.skip(f"{PAPER_TASKS} is absent")
    gsm = load_task("gsm8k", PAPER_TASKS / "test-reasoning.jsonl", limit=1)[0]
    assert gsm.references == ("18",)
    assert gsm.prompt.startswith("Q: Janet\u2019s ducks lay 16 eggs per day.")
    assert "9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market. Therefore, the answer" in gsm.prompt
    nq = load_task("nq", PAPER_TASKS / "test-OpenDomainQA.jsonl", limit=1)[0]
    assert nq.references == ("Wilhelm Conrad R\u00f6ntgen",)
    assert "Passage: The first Nobel Prize" in nq.prompt  # the passage's leading newlines are gone
    rte = load_task("rte", PAPER_TASKS / "test-NLI.tsv", limit=-1)
    assert {e.references[0] for e in rte} == {"entailment", "not_entailment"}
    samsum = load_task("samsum", PAPER_TASKS / "test-summarization.json", limit=1)[0]
    assert samsum.meta["id"] == "13817023" and samsum.prompt.endswith("\nTL;DR:")
