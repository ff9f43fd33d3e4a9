"""Nothing lost, nothing corrupted: the edited model's folder, bad updates, prompts too long for the model, an
ill-conditioned C, an inconsistent resume, and the smaller refusals - each as a hostile user would meet it."""

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.callbacks import PRUNECallback
from prune_lightning.editors import Editor, LowRankUpdate, ROME
from prune_lightning.models import get_parameter
from prune_lightning.safety import MARKER, BadUpdateError


def _module(tiny_model_dir, editor, **kwargs):
    return SequentialEditor(model=str(tiny_model_dir), editor=editor, verbose=False, **kwargs)


class NaNAfter(Editor):
    """Wraps an editor; from its ``bad_from``-th batch on its updates hold a NaN."""

    def __init__(self, inner: Editor, bad_from: int = 1) -> None:
        self.inner, self.bad_from, self.calls = inner, bad_from, 0

    def parameter_names(self, model):
        return self.inner.parameter_names(model)

    def setup(self, model, tokenizer):
        self.inner.setup(model, tokenizer)

    def compute_update(self, model, tokenizer, requests):
        updates = self.inner.compute_update(model, tokenizer, requests)
        self.calls += 1
        if self.calls > self.bad_from:
            for update in updates.values():
                update.left[0, 0] = float("nan")
        return updates


# --------------------------------------------------------------------------------------------------------------------
# the edited model's folder
# --------------------------------------------------------------------------------------------------------------------


def test_a_foreign_folder_survives_and_is_refused_before_any_edit(tiny_model_dir, counterfact_file, make_trainer,
                                                                  rome_factory, tmp_path):
    foreign = tmp_path / "my_results"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    module = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2), edited_model_dir=str(foreign))
    trainer = make_trainer()
    with pytest.raises(ValueError, match=r"my_results: the folder is not empty and was not written by prune-lightning"):
        trainer.fit(module, datamodule=EditDataModule(source=str(counterfact_file(2))))
    assert trainer.global_step == 0  # refused in setup, before the first edit
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "years of work"

    # With overwrite=True it is replaced; a folder this project wrote (it has the marker) is replaced without asking.
    module = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2), edited_model_dir=str(foreign), overwrite=True)
    make_trainer().fit(module, datamodule=EditDataModule(source=str(counterfact_file(2))))
    assert (foreign / MARKER).is_file() and not (foreign / "thesis.tex").exists()
    provenance = json.loads((foreign / MARKER).read_text())
    assert provenance["requests_edited"] == 2 and provenance["editor"]["class"].endswith("ROME")
    again = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2), edited_model_dir=str(foreign))
    make_trainer().fit(again, datamodule=EditDataModule(source=str(counterfact_file(1))))
    assert json.loads((foreign / MARKER).read_text())["requests_edited"] == 1


def test_a_save_that_fails_midway_leaves_the_previous_model_whole(tiny_model_dir, rome_factory, tmp_path,
                                                                  monkeypatch):
    from transformers import AutoModelForCausalLM

    module = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2))
    target = tmp_path / "edited"
    module.save_edited_model(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    (name,) = module.edited_parameter_names
    with torch.no_grad():
        get_parameter(module.model, name).add_(1.0)  # a different model to save

    original = type(module.model).save_pretrained

    def dies_midway(self, save_directory, *args, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"half a file")  # then the process is killed
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(type(module.model), "save_pretrained", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        module.save_edited_model(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the previous save, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # no half-written sibling left
    AutoModelForCausalLM.from_pretrained(target)  # and it loads

    monkeypatch.setattr(type(module.model), "save_pretrained", original)
    module.save_edited_model(target)  # a complete save replaces it
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    torch.testing.assert_close(get_parameter(reloaded, name), get_parameter(module.model, name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


# --------------------------------------------------------------------------------------------------------------------
# updates
# --------------------------------------------------------------------------------------------------------------------


def test_a_non_finite_update_is_refused_and_named(tiny_model_dir, counterfact_file, make_trainer, rome_factory):
    from lightning.pytorch.callbacks import Callback

    source = counterfact_file(3)
    module = _module(tiny_model_dir, NaNAfter(rome_factory(v_num_grad_steps=2), bad_from=1))
    (name,) = module.edited_parameter_names
    weights = {}

    class Snapshot(Callback):  # the weights after each batch
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights[trainer.global_step] = get_parameter(pl_module.model, name).detach().clone()

    # With PRUNE, a NaN used to crash inside linalg.svd without naming the edit.
    trainer = make_trainer(callbacks=[PRUNECallback(alpha=100.0), Snapshot()])
    with pytest.raises(BadUpdateError) as info:
        trainer.fit(module, datamodule=EditDataModule(source=str(source)))
    message = str(info.value)
    assert f"{source}: record 1 (case_id 1)" in message  # the request: file, record, case_id
    assert name in message and "non-finite" in message  # and the matrix
    assert module.requests_edited == 1 and torch.isfinite(module.edit_registry[name].delta.dense()).all()
    torch.testing.assert_close(get_parameter(module.model, name), weights[1])  # as before the bad batch
    assert not module.edited_model_dir.exists()  # nothing saved


def test_skip_leaves_the_weights_and_goes_on(tiny_model_dir, counterfact_file, make_trainer, rome_factory):
    from conftest import read_csv_metrics

    module = _module(tiny_model_dir, NaNAfter(rome_factory(v_num_grad_steps=2), bad_from=1), on_bad_update="skip")
    (name,) = module.edited_parameter_names
    trainer = make_trainer()
    with pytest.warns(UserWarning, match=r"record 1 \(case_id 1\).*skipped"):
        trainer.fit(module, datamodule=EditDataModule(source=str(counterfact_file(3))))
    assert trainer.global_step == 3 and module.requests_edited == 1 and module.requests_skipped == 2
    assert module.edit_registry[name].delta.rank == 1 and torch.isfinite(get_parameter(module.model, name)).all()
    assert [float(r["edit/skipped"]) for r in read_csv_metrics(trainer) if r.get("edit/skipped")] == [0, 1, 2]
    with pytest.raises(ValueError, match="on_bad_update must be one of"):
        _module(tiny_model_dir, rome_factory(), on_bad_update="ignore")


# --------------------------------------------------------------------------------------------------------------------
# inputs: prompts that do not fit, before any output
# --------------------------------------------------------------------------------------------------------------------


def _long_prompt_file(repo_dir: Path, tmp_path: Path, field: str) -> Path:
    records = json.loads((repo_dir / "configs" / "data" / "counterfact-tiny.json").read_text())
    if field == "prompt":
        records[2]["requested_rewrite"]["prompt"] = "Once upon a time " * 40 + "{} lived in"
    else:
        records[3]["paraphrase_prompts"][1] = "And so on " * 60
    path = tmp_path / "data" / "cf.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("field, where", [("prompt", r"record 2 \(case_id 2\): field 'prompt'"),
                                          ("paraphrase", r"record 3 \(case_id 3\): field 'paraphrase_prompts\[1\]'")])
def test_a_prompt_longer_than_the_context_is_named_before_any_output(repo_dir, tmp_path, monkeypatch, capsys,
                                                                     field, where):
    from prune_lightning.cli import main

    source = _long_prompt_file(repo_dir, tmp_path, field)
    run = tmp_path / "run"
    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", f"--data.source={source}", f"--trainer.default_root_dir={run}",
              f"--trainer.logger.init_args.save_dir={run}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2  # one message and the hint, no traceback
    assert f"prune-edit: error: {source}: " in err and __import__("re").search(where, err)
    assert "but the model takes at most 128" in err
    assert not run.exists()  # no config.yaml, hparams.yaml, metrics.csv, nor an empty log folder


def test_debug_shows_the_traceback(repo_dir, tmp_path, monkeypatch):
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(ValueError, match="v_lr must be positive, got -1.0"):
        main(["fit", "--config", "configs/tiny.yaml", "--model.editor.init_args.v_lr=-1", "--debug",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])


def test_a_setting_error_is_one_short_line(repo_dir, tmp_path, monkeypatch, capsys):
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", "--model.editor.init_args.v_lr=-1",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[0] == "prune-edit: error: v_lr must be positive, got -1.0"


def test_stats_max_length_beyond_the_context_is_refused_before_output(tiny_model_dir, tiny_corpus, tmp_path):
    from prune_lightning.models import load_causal_lm, load_tokenizer
    from prune_lightning.stats import second_moments
    from prune_lightning.stats.cli import main as stats_main

    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    name = ROME(layer=1).parameter_names(model)[0].removesuffix(".weight")
    context = model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings") \
        else model.config.n_positions
    with pytest.raises(ValueError, match=rf"max_length={context + 1} exceeds the model's context of {context}"):
        second_moments(model, tokenizer, [name], str(tiny_corpus), n_samples=5, max_length=context + 1,
                       cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        stats_main(["--model", str(tiny_model_dir), "--modules", name, "--corpus", str(tiny_corpus),
                    "--max_length", str(context + 1), "--cache_dir", str(tmp_path / "cache")])
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------------------------


def test_an_ill_conditioned_c_is_reported_with_numbers_and_remedy(tiny_model_dir, tiny_corpus):
    from prune_lightning.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    with pytest.warns(UserWarning, match=r"summed over \d+ tokens, fewer than its dimension \d+.*mom2_n_samples"):
        ROME(layer=1, mom2_corpus=str(tiny_corpus), mom2_n_samples=1, context_template_lengths=((3, 1),)).setup(
            model, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ROME(layer=1, mom2_corpus=str(tiny_corpus), mom2_n_samples=200, context_template_lengths=((3, 1),)).setup(
            model, tokenizer)
    assert not [w for w in caught if "ill-conditioned" in str(w.message)]


def test_two_jobs_cannot_share_one_partial_checkpoint(tmp_path):
    from prune_lightning.stats.run import StatsLockedError, checkpoint_lock

    with checkpoint_lock(tmp_path / "partial"):
        with pytest.raises(StatsLockedError, match=rf"\(pid {os.getpid()} on .*\) is computing into .*partial"):
            with checkpoint_lock(tmp_path / "partial"):
                pass
    with checkpoint_lock(tmp_path / "partial"):  # released: the next job may go on
        pass


# --------------------------------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------------------------------


def test_a_resume_with_another_layer_or_restraint_is_refused(tiny_model_dir, counterfact_file, make_trainer,
                                                             rome_factory, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    source = str(counterfact_file(4))
    checkpoints = tmp_path / "ckpt"
    first = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2), save_edited_model=False)
    make_trainer(callbacks=[PRUNECallback(alpha=100.0), ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1,
                                                                        save_top_k=-1)],
                 enable_checkpointing=True, max_steps=2).fit(first, datamodule=EditDataModule(source=source))
    ckpt = str(checkpoints / "epoch=0-step=2.ckpt")

    other_layer = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2, layer=0), save_edited_model=False)
    with pytest.raises(ValueError, match=r"Cannot resume.*editor.layer: 1 in the checkpoint, 0 now"):
        make_trainer(callbacks=[PRUNECallback(alpha=100.0)]).fit(
            other_layer, datamodule=EditDataModule(source=source), ckpt_path=ckpt)
    assert other_layer.requests_edited == 0 and other_layer.edit_registry.names() == \
        other_layer.edited_parameter_names  # nothing of the checkpoint was taken in

    other_alpha = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2), save_edited_model=False)
    with pytest.raises(ValueError, match=r"Cannot resume.*restraints: PRUNECallback.*alpha.: 100.0.*alpha.: 2.0"):
        make_trainer(callbacks=[PRUNECallback(alpha=2.0)]).fit(
            other_alpha, datamodule=EditDataModule(source=source), ckpt_path=ckpt)

    # The same settings resume; where to save may change.
    same = _module(tiny_model_dir, rome_factory(v_num_grad_steps=2), edited_model_dir=str(tmp_path / "elsewhere"))
    trainer = make_trainer(callbacks=[PRUNECallback(alpha=100.0)])
    trainer.fit(same, datamodule=EditDataModule(source=source), ckpt_path=ckpt)
    assert trainer.global_step == 4 and same.requests_edited == 4 and (tmp_path / "elsewhere" / MARKER).is_file()


# --------------------------------------------------------------------------------------------------------------------
# smaller ones
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [math.inf, math.nan, 1.0, "e"])
def test_prune_refuses_an_alpha_that_is_not_a_finite_number_above_one(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 1"):
        PRUNECallback(alpha=alpha)


def test_an_empty_file_is_reported_as_empty(tmp_path):
    from prune_lightning.data import read_counterfact
    from prune_lightning.data.sources import SourceError

    for name in ("empty.json", "blank.jsonl"):
        (tmp_path / name).write_text("\n \n" if name.startswith("blank") else "")
        with pytest.raises(SourceError, match=rf"{name}: is empty; expected JSON records"):
            read_counterfact(tmp_path / name)


def test_a_hub_revision_reaches_the_model_loader_and_the_saved_config(tiny_model_dir, rome_factory, monkeypatch):
    import prune_lightning.module as module_mod

    seen = {}
    real = module_mod.load_causal_lm

    def spy(name, dtype="float32", revision=None, **kwargs):
        seen["revision"] = revision
        return real(name, dtype=dtype, **kwargs)

    monkeypatch.setattr(module_mod, "load_causal_lm", spy)
    module = _module(tiny_model_dir, rome_factory(), revision="v1.0")
    assert seen["revision"] == "v1.0" and module.hparams.revision == "v1.0"
