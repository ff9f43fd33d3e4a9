"""Tests of the data layer: EditRequest, the CounterFact and zsRE readers, sources, and EditDataModule."""

from __future__ import annotations

import copy
import http.server
import json
import threading
import time
import warnings
from pathlib import Path

import pytest

from prune_lightning.data import (
    EditDataModule,
    EditRequest,
    RecordError,
    SourceError,
    read_counterfact,
    read_requests,
    read_zsre,
    resolve_source,
)

# --------------------------------------------------------------------------------------------------------------------
# records in the real schemas
# --------------------------------------------------------------------------------------------------------------------


def _cf_record(i: int) -> dict:
    return {
        "case_id": i,
        "pararel_idx": 100 + i,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "subject": f"Person {i}",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": [f"Person {i} grew up speaking", f"The first language of Person {i} is"],
        "neighborhood_prompts": ["The mother tongue of Victor Hugo is", "The mother tongue of Edith Piaf is"],
        "attribute_prompts": ["The mother tongue of Charles Dickens is"],
        "generation_prompts": [f"Person {i}'s mother tongue is"],
    }


def _zsre_record(i: int) -> dict:
    return {
        "subject": f"Watts Humphrey {i}",
        "src": f"What university did Watts Humphrey {i} attend?",
        "pred": "Trinity College",
        "rephrase": f"What university did Watts Humphrey {i} take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": f"Trinity College >> University of Michigan || What university did Watts Humphrey {i} attend?",
    }


def _write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _request(**overrides) -> EditRequest:
    kwargs = dict(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                  target_true="French")
    kwargs.update(overrides)
    return EditRequest(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# EditRequest
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"prompt": "The mother tongue of Danielle Darrieux is"}, r"field 'prompt'.*exactly one '\{\}'.*found 0"),
        ({"prompt": "{} and {} speak"}, r"field 'prompt'.*found 2"),
        ({"prompt": "{} speaks {lang}"}, r"field 'prompt'.*not a valid template"),
        ({"prompt": None}, r"field 'prompt': expected a string"),
        ({"subject": ""}, r"field 'subject': is empty"),
        ({"subject": "   "}, r"field 'subject': is empty"),
        ({"target_new": ""}, r"field 'target_new': is empty"),
        ({"target_new": " English"}, r"field 'target_new'.*starts with whitespace"),
        ({"target_new": "French"}, r"field 'target_new'.*equals target_true"),
        ({"target_true": ""}, r"field 'target_true': is empty"),
        ({"paraphrase_prompts": ["ok", 3]}, r"field 'paraphrase_prompts\[1\]': expected a string, got int"),
        ({"neighborhood_prompts": "one prompt"}, r"field 'neighborhood_prompts': expected a list of strings"),
        ({"neighborhood_prompts": ["a", "b"], "neighborhood_targets": ["x"]}, r"field 'neighborhood_targets'"),
        ({"case_id": 1.5}, r"field 'case_id'"),
        ({"case_id": True}, r"field 'case_id'"),
        ({"relation_id": 103}, r"field 'relation_id'"),
        ({"generation_prompts": [None]}, r"field 'generation_prompts\[0\]'"),
    ],
)
def test_edit_request_rejects_bad_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        _request(**overrides)


def test_edit_request_converts_lists_and_round_trips():
    request = _request(
        paraphrase_prompts=["Danielle Darrieux grew up speaking"],
        neighborhood_prompts=["The mother tongue of Victor Hugo is"],
        case_id="cf-0",
        relation_id="P103",
    )
    assert request.paraphrase_prompts == ("Danielle Darrieux grew up speaking",)
    assert isinstance(request.neighborhood_prompts, tuple)
    assert request.rendered_prompt == "The mother tongue of Danielle Darrieux is"
    hash(request)  # frozen and made of tuples: usable as a key
    data = json.loads(json.dumps(request.to_dict()))
    assert data["paraphrase_prompts"] == ["Danielle Darrieux grew up speaking"]
    assert EditRequest.from_dict(data) == request
    with pytest.raises(ValueError, match="unknown field.*'bogus'"):
        EditRequest.from_dict({**data, "bogus": 1})
    with pytest.raises(Exception):
        request.subject = "someone else"  # frozen


def test_edit_request_allows_escaped_braces_and_no_true_target():
    request = _request(prompt="In {{set}} notation, {} speaks", target_true=None)
    assert request.rendered_prompt == "In {set} notation, Danielle Darrieux speaks"
    assert request.target_true is None


# --------------------------------------------------------------------------------------------------------------------
# CounterFact
# --------------------------------------------------------------------------------------------------------------------


def test_read_counterfact_maps_the_schema(tmp_path):
    path = _write_json(tmp_path / "counterfact.json", [_cf_record(i) for i in range(3)])
    requests = read_counterfact(path)
    assert [r.case_id for r in requests] == [0, 1, 2]
    first = requests[0]
    assert first.prompt == "The mother tongue of {} is"
    assert first.subject == "Person 0"
    assert first.target_new == "English"
    assert first.target_true == "French"
    assert first.relation_id == "P103"
    assert first.paraphrase_prompts == ("Person 0 grew up speaking", "The first language of Person 0 is")
    assert first.neighborhood_prompts == ("The mother tongue of Victor Hugo is", "The mother tongue of Edith Piaf is")
    assert first.neighborhood_targets == ()  # CounterFact's neighbours keep target_true
    assert first.attribute_prompts == ("The mother tongue of Charles Dickens is",)
    assert first.generation_prompts == ("Person 0's mother tongue is",)


def test_read_counterfact_optional_fields_and_target_whitespace(tmp_path):
    record = _cf_record(0)
    del record["attribute_prompts"], record["generation_prompts"], record["requested_rewrite"]["relation_id"]
    record["requested_rewrite"]["target_new"]["str"] = " English"
    (request,) = read_counterfact(_write_json(tmp_path / "cf.json", [record]))
    assert request.attribute_prompts == () and request.generation_prompts == ()
    assert request.relation_id is None
    assert request.target_new == "English"


def test_read_counterfact_limit_offset_and_jsonl(tmp_path):
    records = [_cf_record(i) for i in range(6)]
    as_json = _write_json(tmp_path / "cf.json", records)
    as_jsonl = _write_jsonl(tmp_path / "cf.jsonl", records)
    for path in (as_json, as_jsonl):
        assert [r.case_id for r in read_counterfact(path, limit=2, offset=3)] == [3, 4]
        assert [r.case_id for r in read_counterfact(path, offset=4)] == [4, 5]
        assert [r.case_id for r in read_counterfact(path, limit=0)] == []
        assert [r.case_id for r in read_counterfact(path, offset=10)] == []
    with pytest.raises(ValueError, match="offset"):
        read_counterfact(as_json, offset=-1)
    with pytest.raises(ValueError, match="limit"):
        read_counterfact(as_json, limit=-2)


def _del(path: str):
    def edit(record):
        *parents, last = path.split(".")
        node = record
        for key in parents:
            node = node[key]
        del node[last]

    return edit


def _set(path: str, value):
    def edit(record):
        *parents, last = path.split(".")
        node = record
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (_del("requested_rewrite.target_new.str"), "requested_rewrite.target_new.str", "missing"),
        (_del("requested_rewrite.target_true"), "requested_rewrite.target_true.str", "missing"),
        (_del("case_id"), "case_id", "missing"),
        (_del("paraphrase_prompts"), "paraphrase_prompts", "missing"),
        (_set("requested_rewrite.subject", 42), "requested_rewrite.subject", "expected a string, got int"),
        (_set("requested_rewrite", "oops"), "requested_rewrite", "expected an object"),
        (_set("requested_rewrite.target_new", "English"), "requested_rewrite.target_new", "expected an object"),
        (_set("paraphrase_prompts", "a prompt"), "paraphrase_prompts", "expected a list of strings"),
        (_set("neighborhood_prompts", ["ok", 7]), "neighborhood_prompts[1]", "expected a string, got int"),
        (_set("case_id", 2.5), "case_id", "expected an int or a string"),
        (_set("requested_rewrite.prompt", "Person 2 speaks"), "requested_rewrite.prompt", "exactly one"),
        (_set("requested_rewrite.prompt", "{} and {}"), "requested_rewrite.prompt", "found 2"),
        (_set("requested_rewrite.subject", ""), "requested_rewrite.subject", "is empty"),
        (_set("requested_rewrite.target_new.str", "French"), "requested_rewrite.target_new.str", "equals target_true"),
    ],
)
def test_read_counterfact_malformed_record_names_file_index_and_field(tmp_path, edit, field, problem):
    records = [_cf_record(i) for i in range(3)]
    edit(records[2])
    path = _write_json(tmp_path / "cf.json", records)
    with pytest.raises(RecordError) as info:
        read_counterfact(path)
    err = info.value
    assert (err.path, err.index, err.field) == (str(path), 2, field)
    assert str(err).startswith(f"{path}: record 2: field '{field}': ")
    assert problem in str(err)


def test_read_counterfact_record_that_is_not_an_object(tmp_path):
    path = _write_json(tmp_path / "cf.json", [_cf_record(0), ["not", "a", "record"]])
    with pytest.raises(RecordError, match=r"cf\.json: record 1: expected an object.*got list") as info:
        read_counterfact(path)
    assert info.value.field is None


def test_read_counterfact_offset_keeps_file_indices_in_errors(tmp_path):
    records = [_cf_record(i) for i in range(5)]
    del records[3]["case_id"]
    path = _write_json(tmp_path / "cf.json", records)
    assert len(read_counterfact(path, limit=3)) == 3  # records outside the window are not checked
    with pytest.raises(RecordError, match="record 3: field 'case_id': missing"):
        read_counterfact(path, offset=2)


# --------------------------------------------------------------------------------------------------------------------
# zsRE
# --------------------------------------------------------------------------------------------------------------------


def test_read_zsre_maps_the_schema_for_both_target_conventions(tmp_path):
    path = _write_json(tmp_path / "zsre_mem_eval.json", [_zsre_record(i) for i in range(3)])
    rome = read_zsre(path)
    easy = read_zsre(path, target="alt")
    assert [r.target_new for r in rome] == ["Illinois Institute of Technology"] * 3
    assert [r.target_new for r in easy] == ["University of Michigan"] * 3
    first = rome[1]
    assert first.prompt == "What university did {} attend?"
    assert first.subject == "Watts Humphrey 1"
    assert first.rendered_prompt == "What university did Watts Humphrey 1 attend?"
    assert first.target_true is None
    assert first.paraphrase_prompts == ("What university did Watts Humphrey 1 take part in?",)
    # As the authors' evaluation scores it (kmeng01/rome dsets/zsre.py): the loc question, prefix kept, and "?"
    assert first.neighborhood_prompts == ("nq question: who played desmond doss father in hacksaw ridge?",)
    assert first.neighborhood_targets == ("Hugo Weaving",)
    assert [r.case_id for r in rome] == [0, 1, 2]
    assert [r.case_id for r in read_zsre(path, offset=1, limit=1)] == [1]
    with pytest.raises(ValueError, match="target must be one of"):
        read_zsre(path, target="pred")


def test_read_zsre_templates_first_occurrence_escapes_braces_and_keeps_own_ids(tmp_path):
    record = _zsre_record(0)
    record.update(subject="Kim", src="Did Kim {really} meet Kim?", id="z-17")
    (request,) = read_zsre(_write_json(tmp_path / "z.json", [record]))
    assert request.prompt == "Did {} {{really}} meet Kim?"
    assert request.rendered_prompt == "Did Kim {really} meet Kim?"
    assert request.case_id == "z-17"


@pytest.mark.parametrize(
    ("key", "value", "field", "problem"),
    [
        ("subject", "Nobody", "subject", "does not occur in src"),
        ("answers", [], "answers", "is empty"),
        ("answers", None, "answers", "got null"),
        ("answers", [" "], "answers[0]", "is empty"),
        ("loc_ans", ["a", "b"], "loc_ans", "2 answers for 1 loc"),
        ("rephrase", 5, "rephrase", "expected a string or a list of strings"),
        ("src", "What university did {} attend?", "subject", "does not occur"),
    ],
)
def test_read_zsre_malformed_record(tmp_path, key, value, field, problem):
    records = [_zsre_record(i) for i in range(2)]
    records[1][key] = value
    path = _write_json(tmp_path / "z.json", records)
    with pytest.raises(RecordError) as info:
        read_zsre(path)
    assert (info.value.index, info.value.field) == (1, field)
    assert str(info.value).startswith(f"{path}: record 1: field '{field}'")
    assert problem in str(info.value)


def test_read_zsre_missing_target_field_depends_on_convention(tmp_path):
    record = _zsre_record(0)
    del record["alt"]
    path = _write_json(tmp_path / "z.json", [record])
    assert read_zsre(path, target="answers")[0].target_new == "Illinois Institute of Technology"
    with pytest.raises(RecordError, match="record 0: field 'alt': missing"):
        read_zsre(path, target="alt")


def test_read_requests_dispatches(tmp_path):
    cf = _write_json(tmp_path / "cf.json", [_cf_record(0)])
    zs = _write_json(tmp_path / "z.json", [_zsre_record(0)])
    assert read_requests("counterfact", cf)[0].target_true == "French"
    assert read_requests("zsre", zs, zsre_target="alt")[0].target_new == "University of Michigan"
    with pytest.raises(ValueError, match="Unknown request format 'mquake'"):
        read_requests("mquake", cf)


# --------------------------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------------------------


def test_not_json_and_wrong_top_level(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"case_id": 0,', encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad\.json: line 1: not valid JSON"):
        read_counterfact(bad)
    obj = _write_json(tmp_path / "obj.json", {"data": [_cf_record(0)]})
    with pytest.raises(SourceError, match=r"obj\.json: expected a JSON array of records.*got an object"):
        read_counterfact(obj)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SourceError, match=r"bin\.json: not a UTF-8"):
        read_counterfact(binary)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "cf.jsonl"
    lines = [json.dumps(_cf_record(0)), "", json.dumps(_cf_record(1)), '{"case_id": 2,']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"cf\.jsonl: line 4: not valid JSON") as info:
        read_counterfact(path)
    assert info.value.line == 4


def test_jsonl_record_index_skips_blank_lines(tmp_path):
    path = tmp_path / "cf.jsonl"
    bad = _cf_record(1)
    del bad["requested_rewrite"]["subject"]
    path.write_text(f"{json.dumps(_cf_record(0))}\n\n{json.dumps(bad)}\n", encoding="utf-8")
    with pytest.raises(RecordError, match="record 1: field 'requested_rewrite.subject': missing"):
        read_counterfact(path)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*'hub:<dataset_id>"):
        resolve_source(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError):
        resolve_source("azhx/counterfact")  # a bare id is a path, not a hub guess
    with pytest.raises(SourceError, match="is not a file"):
        resolve_source(tmp_path)


class _CountingServer:
    """A local HTTP server on 127.0.0.1 in a thread that serves a dict of paths and counts requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.hits: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                owner.hits.append(self.path)
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_url_is_downloaded_once_and_cached(tmp_path):
    body = json.dumps([_cf_record(i) for i in range(3)]).encode()
    cache = tmp_path / "downloads"
    with _CountingServer({"/data/counterfact.json": body}) as server:
        url = f"{server.url}/data/counterfact.json"
        first = resolve_source(url, cache_dir=cache, allow_http=True)  # a local test server speaks plain http
        second = resolve_source(url, cache_dir=cache, allow_http=True)
        assert server.hits == ["/data/counterfact.json"]
        assert first == second and first.read_bytes() == body
        assert first.parent == cache and first.name.endswith("-counterfact.json")
        # a failed download leaves nothing behind
        with pytest.raises(SourceError, match="download failed.*404"):
            resolve_source(f"{server.url}/missing.json", cache_dir=cache, allow_http=True)
        assert sorted(p.name for p in cache.iterdir()) == [first.name]


def test_plain_http_needs_an_opt_in_and_a_digest_pins_the_content(tmp_path):
    import hashlib

    body = json.dumps([_cf_record(i) for i in range(2)]).encode()
    digest = hashlib.sha256(body).hexdigest()
    cache = tmp_path / "downloads"
    with _CountingServer({"/cf.json": body}) as server:
        url = f"{server.url}/cf.json"
        with pytest.raises(SourceError, match="plain http is refused"):
            resolve_source(url, cache_dir=cache)
        assert server.hits == [] and not cache.exists()  # refused before any connection or file
        wrong = "0" * 64
        with pytest.raises(SourceError, match=rf"SHA-256 is {digest}, not {wrong}; nothing was kept"):
            resolve_source(f"{url}#sha256={wrong}", cache_dir=cache, allow_http=True)
        assert list(cache.iterdir()) == []
        path = resolve_source(f"{url}#sha256={digest}", cache_dir=cache, allow_http=True)
        assert path.read_bytes() == body
        with pytest.raises(SourceError, match="must be '#sha256=<64 hex digits>'"):
            resolve_source(f"{url}#md5=abc", cache_dir=cache, allow_http=True)
    # The cached copy is checked at every use: one that changed on disk is refused, naming it.
    path.write_bytes(body + b" ")
    with pytest.raises(SourceError, match=rf"cached copy {path} has SHA-256 .*delete it to download"):
        resolve_source(f"{url}#sha256={digest}", cache_dir=cache, allow_http=True)


def test_url_default_cache_and_reader(tmp_path, _cache_dir):
    body = json.dumps([_cf_record(i) for i in range(2)]).encode()
    with _CountingServer({"/cf.json": body}) as server:
        url = f"{server.url}/cf.json"
        assert [r.case_id for r in read_counterfact(url, allow_http=True)] == [0, 1]
        assert [r.case_id for r in read_counterfact(url, offset=1, allow_http=True)] == [1]
        assert len(server.hits) == 1
    cached = resolve_source(url, allow_http=True)  # the server is gone: served from the cache
    assert cached.parent == Path(_cache_dir) / "downloads"


def test_url_error_names_url_and_cache(tmp_path):
    records = [_cf_record(0)]
    del records[0]["case_id"]
    with _CountingServer({"/cf.json": json.dumps(records).encode()}) as server:
        url = f"{server.url}/cf.json"
        with pytest.raises(RecordError, match=rf"{url} \(cached at .*\): record 0: field 'case_id': missing"):
            read_counterfact(url, allow_http=True)


def test_hub_dataset_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"hub:nobody-here/no-such-dataset: could not load hub dataset.*offline"):
        resolve_source("hub:nobody-here/no-such-dataset")
    assert time.monotonic() - start < 30
    with pytest.raises(SourceError, match="expected 'hub:<dataset_id>"):
        resolve_source("hub:")


def test_hub_spec_parsing():
    from prune_lightning.data.sources import _parse_hub

    assert _parse_hub("hub:azhx/counterfact") == ("azhx/counterfact", None, "train")
    assert _parse_hub("hub:org/ds:cfg@test[:100]") == ("org/ds", "cfg", "test[:100]")


def test_records_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([_cf_record(i) for i in range(5)])
    requests = read_counterfact(ds, offset=1, limit=3)
    assert [r.case_id for r in requests] == [1, 2, 3]
    assert requests[0].target_new == "English" and requests[0].paraphrase_prompts[0] == "Person 1 grew up speaking"


# --------------------------------------------------------------------------------------------------------------------
# the shipped tiny CounterFact file
# --------------------------------------------------------------------------------------------------------------------


def test_shipped_counterfact_tiny_loads(repo_dir):
    requests = read_counterfact(repo_dir / "configs" / "data" / "counterfact-tiny.json")
    assert [r.case_id for r in requests] == list(range(8))
    assert len({r.relation_id for r in requests}) == 8
    for r in requests:
        assert r.relation_id.startswith("P")
        assert len(r.paraphrase_prompts) == 2
        assert 3 <= len(r.neighborhood_prompts) <= 5
        assert 1 <= len(r.attribute_prompts) <= 2 and 1 <= len(r.generation_prompts) <= 2
        assert all(r.subject in p for p in r.paraphrase_prompts + r.generation_prompts)
        assert not any(r.subject in p for p in r.neighborhood_prompts + r.attribute_prompts)


# --------------------------------------------------------------------------------------------------------------------
# EditDataModule
# --------------------------------------------------------------------------------------------------------------------


def _case_ids(loader) -> list[list]:
    return [[r.case_id for r in batch] for batch in loader]


def test_datamodule_serves_ordered_batches(tmp_path):
    path = _write_json(tmp_path / "cf.json", [_cf_record(i) for i in range(8)])
    dm = EditDataModule(str(path), batch_size=3)
    dm.setup("fit")
    assert [r.case_id for r in dm.requests] == list(range(8))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert _case_ids(loader) == [[0, 1, 2], [3, 4, 5], [6, 7]]
        assert all(isinstance(r, EditRequest) for batch in loader for r in batch)
    train = dm.train_dataloader()
    assert len(train) == 3
    assert _case_ids(train) == _case_ids(train)  # every epoch in the same order

    window = EditDataModule(str(path), batch_size=2, offset=3, limit=4)
    assert _case_ids(window.train_dataloader()) == [[3, 4], [5, 6]]


def test_datamodule_zsre_and_argument_checks(tmp_path):
    path = _write_json(tmp_path / "z.json", [_zsre_record(i) for i in range(2)])
    dm = EditDataModule(str(path), format="zsre", zsre_target="alt")
    assert [r.target_new for r in dm.requests] == ["University of Michigan"] * 2
    with pytest.raises(ValueError, match="format must be one of"):
        EditDataModule(str(path), format="mquake")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        EditDataModule(str(path), batch_size=0)
    with pytest.raises(ValueError, match="zsre_target"):
        EditDataModule(str(path), zsre_target="pred")
    with pytest.raises(ValueError, match="limit"):
        EditDataModule(str(path), limit=-1)


def test_train_loader_state_resumes_after_edited_batches(tmp_path):
    path = _write_json(tmp_path / "cf.json", [_cf_record(i) for i in range(7)])
    dm = EditDataModule(str(path), batch_size=2)
    loader = dm.train_dataloader()
    assert loader.state_dict() == {"batches_done": 0, "num_batches": 4, "batch_size": 2}
    loader.load_state_dict({"batches_done": 2, "num_batches": 4, "batch_size": 2})
    assert len(loader) == 4  # the length never changes: Lightning counts batches against it
    assert _case_ids(loader) == [[4, 5], [6]]
    assert _case_ids(loader) == [[0, 1], [2, 3], [4, 5], [6]]  # only the first iteration is shortened
    with pytest.raises(ValueError, match="Cannot resume the edit stream"):
        loader.load_state_dict({"batches_done": 1, "num_batches": 5, "batch_size": 2})


def test_datamodule_fingerprint_refuses_a_different_stream(tmp_path):
    path = _write_json(tmp_path / "cf.json", [_cf_record(i) for i in range(7)])
    state = EditDataModule(str(path), batch_size=2).state_dict()
    assert state["fingerprint"]["count"] == 7 and state["fingerprint"]["batch_size"] == 2
    EditDataModule(str(path), batch_size=2, limit=100).load_state_dict(state)  # same requests: fine
    for changed in ({"offset": 1}, {"batch_size": 3}, {"limit": 5}):
        with pytest.raises(ValueError, match="different stream of edit requests"):
            EditDataModule(str(path), **{"batch_size": 2, **changed}).load_state_dict(state)
    other = copy.deepcopy([_cf_record(i) for i in range(7)])
    other[4]["requested_rewrite"]["target_new"]["str"] = "German"
    with pytest.raises(ValueError, match="digest"):
        EditDataModule(str(_write_json(tmp_path / "other.json", other)), batch_size=2).load_state_dict(state)


# ---- resuming a fit mid-epoch ----------------------------------------------------------------------------------------


def _toy_editor():
    import lightning.pytorch as pl

    class ToyEditor(pl.LightningModule):
        """Stands in for SequentialEditor: records the requests it 'edits'."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.seen: list = []
            self.batch_indices: list[int] = []

        def configure_optimizers(self):
            return None

        def training_step(self, batch, batch_idx):
            self.seen.extend(r.case_id for r in batch)
            self.batch_indices.append(batch_idx)
            self.optimizers().step()  # advances global_step (manual optimization, mock optimizer)

    return ToyEditor()


def _fit(tmp_path, datamodule, ckpt_path=None, checkpoints=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = []
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=2, save_top_k=-1))
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=checkpoints is not None,
        callbacks=callbacks,
    )
    module = _toy_editor()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("batch_size", "step", "expected"),
    [(1, 4, [4, 5, 6]), (1, 2, [2, 3, 4, 5, 6]), (2, 2, [4, 5, 6])],
)
def test_fit_resumes_with_the_first_request_not_yet_edited(tmp_path, batch_size, step, expected):
    path = str(_write_json(tmp_path / "cf.json", [_cf_record(i) for i in range(7)]))
    checkpoints = tmp_path / "checkpoints"
    first, _ = _fit(tmp_path, EditDataModule(path, batch_size=batch_size), checkpoints=checkpoints)
    assert first.seen == list(range(7))

    ckpt = checkpoints / f"epoch=0-step={step}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in checkpoints.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, trainer = _fit(tmp_path / "resumed", EditDataModule(path, batch_size=batch_size), ckpt_path=ckpt)
    assert resumed.seen == expected
    # Lightning sees a resumable loader (it warns about loaders without state_dict / load_state_dict)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    # Lightning's own counters continue where they were: batch_idx and global_step
    assert resumed.batch_indices == list(range(step, step + len(resumed.batch_indices)))
    assert trainer.global_step == -(-7 // batch_size)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_refuses_to_resume_on_another_stream(tmp_path):
    path = str(_write_json(tmp_path / "cf.json", [_cf_record(i) for i in range(7)]))
    checkpoints = tmp_path / "checkpoints"
    _fit(tmp_path, EditDataModule(path), checkpoints=checkpoints)
    with pytest.raises(ValueError, match="different stream of edit requests.*count"):
        _fit(tmp_path / "resumed", EditDataModule(path, offset=1), ckpt_path=checkpoints / "epoch=0-step=4.ckpt")
