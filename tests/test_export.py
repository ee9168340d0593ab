"""Hugging Face export and `lmstack merge`: what lmstack writes, transformers (and PEFT) read with the same
logits, and `LLM.load` reads back. Tiny random Llama / Qwen2 / Gemma 3 models (fast) and SmolLM2 (slow)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_lora import ids_for, max_diff, randomize_lora

from lmstack.adapters import save_adapter
from lmstack.api import LLM
from lmstack.cli import main
from lmstack.lora import LoraConfig, apply_lora, merge_lora
from lmstack.models.export import hf_config_dict, save_hf
from lmstack.models.hf import load_hf
from lmstack.recipes.merge import MergeArgs, merge

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["The capital of France is Paris.", "def f(x):\n    return x + 1", "<|im_start|>user\nhi<|im_end|>"]


def transformers_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def with_random_lora(model: torch.nn.Module, targets: list[str] | str = ALL) -> None:
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model)  # every B nonzero: every module's update shows in the logits


# --- the export, per family --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "gemma3-scaled", "gpt2"])
def test_merged_export_has_the_same_logits_in_transformers_and_lmstack(tiny_hf_model, tmp_path, kind):
    hf, path = tiny_hf_model(kind)
    model, config = load_hf(path)
    with_random_lora(model, ["wq", "wk", "wv", "wo", "w1", "w2"] + (["w3"] if kind != "gpt2" else []))
    ids = ids_for(config.vocab_size, seq=16)  # longer than the Gemma sliding windows (4, 5)
    with torch.no_grad():
        expected = model(ids)
        assert max_diff(expected, hf(ids).logits) > 1e-2  # the adapter matters
        merge_lora(model)
        assert max_diff(model(ids), expected) <= 1e-5
    out = save_hf(model, None, tmp_path / "export")

    with torch.no_grad():
        assert max_diff(transformers_model(out)(ids).logits, expected) <= 1e-5
        reloaded, back = load_hf(out)
        assert max_diff(reloaded(ids), expected) <= 1e-5
    assert back.with_(name=config.name) == config  # the architecture survives the round trip exactly


def test_merge_cli_writes_what_transformers_autotokenizer_and_llm_load_read(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    llm = LLM.load(str(tiny_checkpoint), device="cpu")
    with_random_lora(llm.model, ["q_proj", "v_proj", "down_proj"])
    ids = llm.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        expected = llm.model(torch.tensor([ids]))[0]
    adapter = save_adapter(llm.model, tmp_path / "adapter", base_model_name=str(tiny_checkpoint))
    out = tmp_path / "merged"
    argv = ["merge", "-m", str(tiny_checkpoint), "--adapter", str(adapter), "--out", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path / "home")]) == 0

    with torch.no_grad():
        assert max_diff(transformers_model(out)(torch.tensor([ids])).logits[0], expected) <= 1e-5
    merged = LLM.load(str(out), device="cpu")
    assert max_diff(merged.logits(ids), expected) <= 1e-5
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok.encode(text) == llm.tokenizer.encode(text) == merged.tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        llm.tokenizer.apply_chat_template(messages)
    )
    assert hf_tok.eos_token_id == llm.tokenizer.eos_id == merged.tokenizer.eos_id
    assert merged.tokenizer.stop_ids == llm.tokenizer.stop_ids
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert (
        stops[0] == llm.tokenizer.eos_id and set(stops) == llm.tokenizer.stop_ids
    )  # eos first, then the rest


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_weights_export_exactly(tiny_gguf, tmp_path, arch):
    """llama.cpp's Q/K permutation and Gemma's +1 on norms are undone at load, so the export is plain HF.
    (The tiny GGUF's token list has no merges for a tokenizer: the SmolLM2 test covers GGUF tokenizers.)"""
    from lmstack.hub import load_model

    _, gguf = tiny_gguf(arch)
    loaded = load_model(str(gguf), cache_dir=tmp_path / "home")
    out = save_hf(loaded.model, None, tmp_path / "hf")
    ids = ids_for(loaded.config.vocab_size, batch=1, seq=16)
    with torch.no_grad():
        assert max_diff(transformers_model(out)(ids).logits, loaded.model(ids)) <= 1e-5


def test_bfloat16_export(tiny_checkpoint, tmp_path):
    out = merge(MergeArgs(model=str(tiny_checkpoint), out=tmp_path / "bf16", dtype="bfloat16"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = [1, 5, 9, 3, 7]
    full = LLM.load(str(tiny_checkpoint), device="cpu").logits(ids)
    half = LLM.load(str(out), device="cpu").logits(ids)
    assert 0 < max_diff(full, half) < 0.02 * full.abs().max()  # rounded to bf16, nothing else


# --- bad input ---------------------------------------------------------------------------------------
def test_a_non_empty_out_needs_force_and_force_replaces_only_the_checkpoint(
    tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00002-of-00002.safetensors").write_text("stale shard")
    argv = ["merge", "-m", str(tiny_checkpoint), "--out", str(out)]
    assert main(argv[:-1] + [str(out / "notes.txt")]) == 2
    assert "notes.txt is a file; pass a folder" in capsys.readouterr().err
    assert main(argv) == 2
    assert "exists and is not empty; pick another folder or pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["model-00002-of-00002.safetensors", "notes.txt"]

    assert main([*argv, "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert torch.equal(
        LLM.load(str(out), device="cpu").logits([1, 2, 3]), LLM.load(str(tiny_checkpoint)).logits([1, 2, 3])
    )


def test_missing_and_foreign_adapters_are_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["merge", "-m", str(tiny_checkpoint), "--out", str(out)]
    assert main([*argv, "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "is not a LoRA adapter folder (no adapter_config.json" in capsys.readouterr().err

    llm = LLM.load(str(tiny_checkpoint), device="cpu")
    with_random_lora(llm.model, ["q_proj"])
    adapter = save_adapter(llm.model, tmp_path / "adapter", base_model_name="some-other-model")
    assert main([*argv, "--adapter", str(adapter)]) == 2
    assert "trained on 'some-other-model'" in capsys.readouterr().err
    assert not out.exists()  # nothing written
    with pytest.raises(ValueError, match="--dtype must be one of float32, bfloat16, float16; got 'int8'"):
        merge(MergeArgs(model=str(tiny_checkpoint), out=out, dtype="int8"))


def test_unsupported_models_are_refused_before_anything_is_written(tiny_hf_model, tiny_checkpoint, tmp_path):
    from lmstack.nf4 import quantize_model_nf4

    model, config = load_hf(tiny_hf_model("llama")[1])
    with pytest.raises(ValueError, match="cannot export a 'mamba' model.*exports llama, qwen2, gemma3"):
        hf_config_dict(config.with_(family="mamba"))
    sliding = config.with_(layer_types=("local", "global"), sliding_window=8)
    with pytest.raises(ValueError, match="cannot express sliding_window.*cannot be exported exactly"):
        hf_config_dict(sliding)
    with pytest.raises(ValueError, match="cannot express out_bias"):
        hf_config_dict(config.with_(qkv_bias=True, out_bias=False))  # one Llama switch for q, k, v and o

    int8 = LLM.load(str(tiny_checkpoint), device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="quantized or fused weights.*load the model with dtype float32"):
        save_hf(int8.model, int8.tokenizer, tmp_path / "int8")
    base = LLM.load(str(tiny_checkpoint), device="cpu")
    apply_lora(base.model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="unmerged LoRA layers; merge them first"):
        save_hf(base.model, base.tokenizer, tmp_path / "lora")
    quantize_model_nf4(base.model)
    with pytest.raises(ValueError, match="quantized"):
        save_hf(merge_lora(base.model), base.tokenizer, tmp_path / "nf4")
    assert not any(tmp_path.glob("int8")) and not any(tmp_path.glob("lora")) and not any(tmp_path.glob("nf4"))


# --- the real model: SmolLM2 135M (GGUF) -> Hugging Face, and PEFT on top of it ----------------------------
@pytest.fixture(scope="module")
def smollm2(model_cache_dir, tmp_path_factory) -> tuple[LLM, Path]:
    """The packaged model and its export, in a folder named like the model so PEFT adapters made on the
    export carry a base model name that lmstack recognizes as the same model."""
    out = tmp_path_factory.mktemp("export") / "smollm2-135m-instruct"
    merge(MergeArgs(model="smollm2-135m-instruct", out=out, cache_dir=model_cache_dir))
    return LLM.load("smollm2-135m-instruct", device="cpu", cache_dir=model_cache_dir), out


@pytest.mark.slow
def test_smollm2_export_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    llm, out = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = llm.prompt_ids(messages)
    with torch.no_grad():
        theirs = transformers_model(out)(torch.tensor([ids])).logits[0]
    assert max_diff(theirs, llm.logits(ids)) <= 5e-4  # measured 8.6e-5 over 37 tokens
    assert max_diff(LLM.load(str(out), device="cpu").logits(ids), llm.logits(ids)) == 0
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"] == ids
    for text in TEXTS:
        assert hf_tok.encode(text) == llm.tokenizer.encode(text)


@pytest.mark.slow
def test_peft_round_trip_on_smollm2(smollm2, model_cache_dir, tmp_path):
    peft = pytest.importorskip("peft")
    base, out = smollm2
    ids = ids_for(base.config.vocab_size, batch=1, seq=24)
    # an lmstack adapter, loaded by PEFT onto the exported transformers model
    llm = LLM.load("smollm2-135m-instruct", device="cpu", cache_dir=model_cache_dir)
    with_random_lora(llm.model, ["q_proj", "v_proj", "down_proj"])
    ours = save_adapter(llm.model, tmp_path / "ours", base_model_name="smollm2-135m-instruct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(transformers_model(out), ours).eval()
    with torch.no_grad():
        assert max_diff(peft_model(ids).logits, llm.model(ids)) <= 1e-3
        assert max_diff(llm.model(ids), base.model(ids)) > 0.1  # the adapter matters
    # a PEFT adapter made on the export, loaded by lmstack onto the packaged GGUF model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(transformers_model(out), peft.LoraConfig(r=4, target_modules=ALL))
    randomize_lora(theirs, seed=5)
    theirs.save_pretrained(tmp_path / "theirs")
    tuned = LLM.load(
        "smollm2-135m-instruct", device="cpu", cache_dir=model_cache_dir, adapter=tmp_path / "theirs"
    )
    with torch.no_grad():
        expected = theirs.eval()(ids).logits[0]
    assert max_diff(tuned.logits(ids[0]), expected) <= 1e-3
    assert max_diff(tuned.logits(ids[0]), base.logits(ids[0])) > 0.1  # the adapter matters
