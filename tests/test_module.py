"""SequentialEditor: the editing loop, the registry, the checkpoint and the saved model, on tiny GPT-2 and LLaMA."""

import torch
import pytest

from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.editors import LowRankUpdate
from prune_lightning.models import get_parameter


def _nll(module, request, target):
    """Mean NLL of ' ' + target after the request's prompt (teacher forced), independent of library code."""
    tok = module.tokenizer
    prompt_ids = tok(request.rendered_prompt)["input_ids"]
    target_ids = tok(" " + target)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = module.model(ids).logits[0]
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)
    return -logp[torch.arange(len(target_ids)), torch.tensor(target_ids)].mean().item()


def test_fit_edits_writes_records_and_saves(tiny_model_dir, counterfact_file, make_trainer, rome_factory, tmp_path):
    module = SequentialEditor(model=str(tiny_model_dir), editor=rome_factory(v_num_grad_steps=30))
    data = EditDataModule(source=str(counterfact_file(3)), batch_size=1)
    (name,) = module.edited_parameter_names
    w_start = get_parameter(module.model, name).detach().clone()
    trainer = make_trainer()
    trainer.fit(module, datamodule=data)

    assert trainer.global_step == 3  # one step per edit batch
    entry = module.edit_registry[name]
    assert entry.delta.is_lowrank and entry.delta.rank == 3  # three rank-one ROME writes, kept as factors
    assert torch.equal(entry.w0, w_start)
    w_end = get_parameter(module.model, name).detach()
    assert torch.allclose(w_end, entry.w0 + entry.delta.dense(), atol=1e-6)
    assert not torch.allclose(w_end, w_start)
    # The last edit holds: new target beats the old one on its prompt.
    last = data.requests[-1]
    assert _nll(module, last, last.target_new) < _nll(module, last, last.target_true)

    # The edited model loads with plain transformers and carries the edited weights.
    from transformers import AutoModelForCausalLM

    saved = module.edited_model_dir
    assert (saved / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert torch.allclose(get_parameter(reloaded, name), w_end)


def test_checkpoint_round_trips_registry(tiny_model_dir, counterfact_file, make_trainer, rome_factory, tmp_path):
    module = SequentialEditor(model=str(tiny_model_dir), editor=rome_factory(), save_edited_model=False)
    trainer = make_trainer()
    trainer.fit(module, datamodule=EditDataModule(source=str(counterfact_file(2))))
    path = tmp_path / "edited.ckpt"
    trainer.save_checkpoint(path)

    restored = SequentialEditor.load_from_checkpoint(path, editor=rome_factory())
    (name,) = module.edited_parameter_names
    a, b = module.edit_registry[name], restored.edit_registry[name]
    assert torch.equal(a.w0, b.w0)
    assert b.delta.is_lowrank and b.delta.rank == a.delta.rank == 2
    assert torch.allclose(a.delta.dense(), b.delta.dense())
    assert torch.equal(get_parameter(restored.model, name), get_parameter(module.model, name))
    assert restored.requests_edited == 2
    # The checkpoint keeps W_0, not the edited weight, as the registry's origin.
    assert not torch.equal(b.w0, get_parameter(restored.model, name))


def test_unknown_module_lists_existing_names(tiny_model_dir, rome_factory):
    module = SequentialEditor(model=str(tiny_model_dir),
                              editor=rome_factory(module_template="transformer.h.{}.mlp.no_such_proj"))
    with pytest.raises(ValueError, match=r"does not exist.*(c_proj|down_proj)"):
        module.prepare_editor()


def test_editor_must_follow_protocol(tiny_model_dir):
    with pytest.raises(TypeError, match="must be an Editor"):
        SequentialEditor(model=str(tiny_model_dir), editor=object())


def test_updates_outside_parameter_names_are_refused(tiny_model_dir, rome_factory, counterfact_file):
    class Rogue:
        def __init__(self, inner):
            self.inner = inner

        def parameter_names(self, model):
            return self.inner.parameter_names(model)

        def setup(self, model, tokenizer):
            pass

        def compute_update(self, model, tokenizer, requests):
            name = [n for n, p in model.named_parameters() if p.ndim == 2][0]
            shape = get_parameter(model, name).shape
            return {name: LowRankUpdate(torch.ones(shape[0]), torch.ones(shape[1]))}

    module = SequentialEditor(model=str(tiny_model_dir), editor=Rogue(rome_factory()))
    module.prepare_editor()
    data = EditDataModule(source=str(counterfact_file(1)))
    data.setup("fit")
    with pytest.raises(RuntimeError, match="not among its parameter_names"):
        module.apply_edit(data.requests)


def test_editor_set_up_and_w0_happen_on_the_strategy_device(monkeypatch):
    """Lightning moves the model to its device only after ``setup``; the editor's statistics, templates and the W_0
    copies must not be made on the CPU copy of a model that edits on a GPU (``meta`` stands in for one here)."""
    from types import SimpleNamespace

    module = SequentialEditor(model="tiny:gpt2", save_edited_model=False, verbose=False)
    seen = []
    monkeypatch.setattr(module, "prepare_editor", lambda: seen.append(next(module.model.parameters()).device))
    module._trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("meta")))
    module.setup("fit")
    assert seen == [torch.device("meta")]


@pytest.mark.parametrize("offload", [False, True])
def test_registry_follows_its_parameters_to_their_device(offload):
    """A sharded model reaches its device after W_0 was copied (SequentialEditor.on_fit_start moves the registry);
    ``meta`` stands in for the accelerator. An offloaded W_0 stays in CPU memory."""
    from prune_lightning.models import load_causal_lm
    from prune_lightning.registry import EditRegistry

    model = load_causal_lm("tiny:gpt2")
    registry = EditRegistry(offload=offload)
    (name,) = registry.track(model, ["transformer.h.1.mlp.c_proj.weight"])
    registry[name].record(LowRankUpdate(torch.ones(256, 1), torch.ones(64, 1)))
    model.to("meta")
    registry.to_parameter_devices()
    entry = registry[name]
    assert entry.delta.device.type == "meta" and entry.delta.dense().device.type == "meta"
    assert entry.w0.device.type == ("cpu" if offload else "meta")
