"""LoRA adapters served by name beside their base model: a real server and the official `openai` client
on a tiny random Llama with two random adapters. Each adapter's greedy text must equal the offline merged
model's (`LLM.load(..., adapter=DIR)`), every adapter must share the base's weight tensors, and bad `--lora`
flags must stop `lmstack serve` with a message naming the flag."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from test_serve import MESSAGES, client_for, greedy_reference

from lmstack.adapters import save_adapter
from lmstack.api import LLM
from lmstack.cli import main
from lmstack.lora import LoraConfig, LoraLinear, apply_lora, lora_layers
from lmstack.multi_lora import FusedLoraLinear, adapter_view, lora_bytes
from lmstack.quant import quantize_model
from lmstack.serve import BackgroundServer, ModelEntry, ServerSettings, create_app

TARGETS = {"sql": ["q_proj", "v_proj"], "poem": "all-linear"}  # adapter name -> its target modules
PROMPT = "The capital of France is"


def make_adapter(base: str, path: Path, targets: list[str] | str, seed: int, trained_on: str) -> Path:
    """A random adapter with nonzero B (a fresh one is the identity), saved in PEFT's format; the same
    numbers whichever tests ran before (A's initialization draws from the global generator too)."""
    llm = LLM.load(base, device="cpu")
    torch.manual_seed(seed)
    apply_lora(llm.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            layer.lora_B.weight.normal_(std=0.5)
    return save_adapter(llm.model, path, base_model_name=trained_on)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = str(tiny_checkpoint)
    return {
        name: make_adapter(base, root / name, targets, seed, base)
        for seed, (name, targets) in enumerate(TARGETS.items())
    }


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM.load(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def served(llm, adapters) -> Iterator[tuple[BackgroundServer, dict[str, ModelEntry]]]:
    models = {"tiny": ModelEntry.from_llm("tiny", llm, num_blocks=64)}
    for name, path in adapters.items():
        entry = ModelEntry.from_adapter("tiny", name, llm, path, num_blocks=64)
        models[entry.name] = entry
    srv = BackgroundServer(create_app(models, ServerSettings(embeddings=False))).start()
    yield srv, models
    srv.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return client_for(served[0])


# --- serving ------------------------------------------------------------------------------------------------
def test_base_and_adapters_served_at_once_match_the_merged_models(client, tiny_checkpoint, adapters, llm):
    outputs = {}
    for name in ["tiny", *(f"tiny:{a}" for a in adapters)]:
        adapter = adapters.get(name.partition(":")[2])
        merged = LLM.load(str(tiny_checkpoint), device="cpu", adapter=adapter) if adapter else llm
        _, chat_ref = greedy_reference(merged, MESSAGES, 16, ignore_eos=True)
        _, text_ref = greedy_reference(merged, PROMPT, 16, chat=False, ignore_eos=True)
        chat = client.chat.completions.create(
            model=name, messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        text = client.completions.create(
            model=name, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        assert chat.model == name and chat.choices[0].message.content == chat_ref.text, name
        assert text.model == name and text.choices[0].text == text_ref.text, name
        outputs[name] = text.choices[0].text
    assert len(set(outputs.values())) == 3, outputs  # the adapters change what the model says


def test_adapter_logits_equal_the_merged_model(tiny_checkpoint, adapters, llm):
    ids = torch.tensor([list(range(3, 40))])
    for path in adapters.values():
        merged = LLM.load(str(tiny_checkpoint), device="cpu", adapter=path)
        view = adapter_view(llm.model, path, base_model_name=str(tiny_checkpoint))
        with torch.no_grad():
            torch.testing.assert_close(view(ids), merged.model(ids), rtol=1e-5, atol=1e-5)
            assert (view(ids) - llm.model(ids)).abs().max() > 1e-2  # the adapter matters


def test_adapters_share_the_base_weights(served, llm):
    base = {n: t.data_ptr() for n, t in llm.model.state_dict(keep_vars=True).items()}
    for name in ("tiny:sql", "tiny:poem"):
        model = served[1][name].engine.engine.model
        assert model is not llm.model
        shared = {
            n.replace(".base.", "."): t.data_ptr()
            for n, t in model.state_dict(keep_vars=True).items()
            if ".lora_" not in n
        }
        assert shared == base  # every base tensor, and no copy of any
        assert any(isinstance(m, LoraLinear) for m in model.modules())
    assert not any(isinstance(m, LoraLinear) for m in llm.model.modules())  # the base is left as it was


def test_models_list_adapters_with_their_parent(client, served):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "tiny:sql", "tiny:poem"}
    assert cards["tiny:sql"].parent == "tiny" and cards["tiny:poem"].parent == "tiny"  # type: ignore[attr-defined]
    assert cards["tiny"].parent is None  # type: ignore[attr-defined]
    assert client.models.retrieve("tiny:poem").parent == "tiny"  # type: ignore[attr-defined]


def test_unknown_adapter_is_a_404_listing_the_served_ones(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="tiny:nope", prompt=PROMPT, max_tokens=2)
    message = info.value.body["message"]  # type: ignore[index]
    assert "`tiny:nope`" in message and "Adapters of `tiny`: tiny:poem, tiny:sql." in message
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_a_bare_adapter_name_serves_that_adapter(client):
    """vLLM's style: `model: "sql"` is `tiny:sql` when only one base serves an adapter of that name."""
    bare, full = (
        client.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        for m in ("sql", "tiny:sql")
    )
    assert bare == full
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert "Available models: tiny, tiny:poem, tiny:sql." in info.value.body["message"]  # type: ignore[index]


def test_metrics_are_kept_per_served_name(served, client):
    client.completions.create(model="tiny:sql", prompt=PROMPT, max_tokens=2)
    text = openai.DefaultHttpxClient().get(f"{served[0].url}/metrics").text
    assert 'lmstack_requests_total{finish_reason="length",model="tiny:sql"}' in text
    assert 'model="tiny:poem"' in text  # engine gauges of every served name


# --- quantized bases: fused projections -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_adapter_on_fused_quantized_projections_equals_separate_loras(tiny_checkpoint, adapters, dtype):
    """A quantized base fuses q/k/v and gate/up; a FusedLoraLinear (stacked A, each B at its rows) on a
    fused module must compute what one LoRA per projection computes on the unfused modules, in as many
    bytes."""
    fused = LLM.load(str(tiny_checkpoint), device="cpu", dtype=dtype).model
    unfused = LLM.load(str(tiny_checkpoint), device="cpu").model
    if dtype == "q4":
        from lmstack.api import _keep_8bit

        quantize_model(unfused, "q4", skip=_keep_8bit)
    quantize_model(unfused, "int8")
    attn = fused.attentions()[0]
    assert attn.wqkv is not None or attn.wqk is not None  # the case under test
    x = torch.randn(1, 37, fused.config.dim)  # (B, T, C)
    for path in adapters.values():
        a, b = adapter_view(fused, path), adapter_view(unfused, path)
        assert any(isinstance(m, FusedLoraLinear) for m in a.modules())
        assert lora_bytes(a) == lora_bytes(b) > 0  # no zero blocks for the projections left out
        with torch.no_grad():  # module by module: int8 activation rounding would amplify float noise
            for la, lb in zip(a.layers, b.layers, strict=True):
                for got, want in zip(la.attn.project(x), lb.attn.project(x), strict=True):  # q, k, v
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(la.mlp(x), lb.mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_adapter_on_a_quantized_base_is_as_close_as_merging_then_quantizing(tiny_checkpoint, adapters, dtype):
    """Unmerged over quantized base weights, only the base is rounded; `LLM.load(adapter=..., dtype=...)`
    rounds base + B A. Against the float merged model the served adapter is about as far off: both are one
    draw of the same rounding, so neither is smaller every time (q4's means came 0.0118 vs 0.0117 on CI),
    and the mean is bounded at 1.05x and the max over 57 positions x vocab loosely."""
    base = str(tiny_checkpoint)
    quantized = LLM.load(base, device="cpu", dtype=dtype).model
    ids = torch.tensor([list(range(3, 60))])
    with torch.no_grad():
        for path in adapters.values():
            ref = LLM.load(base, device="cpu", adapter=path).model(ids)
            merged_then_quantized = LLM.load(base, device="cpu", dtype=dtype, adapter=path).model(ids)
            served = adapter_view(quantized, path, base_model_name=base)(ids)
            served_err, merged_err = (served - ref).abs(), (merged_then_quantized - ref).abs()
            assert served_err.mean() <= 1.05 * merged_err.mean()
            assert served_err.max() <= 1.5 * merged_err.max()


def test_nf4_load_keeps_an_adapter_unmerged_on_the_4bit_base(tiny_checkpoint, adapters):
    """LLM.load(dtype="nf4", adapter=...) is the QLoRA setting: the adapter wraps NF4 layers unmerged, and the
    logits stay near the float merged model's (only the base is rounded to 4 bits)."""
    from lmstack.nf4 import NF4Linear

    base, path = str(tiny_checkpoint), adapters["sql"]
    model = LLM.load(base, device="cpu", dtype="nf4", adapter=path).model
    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(isinstance(m.base, NF4Linear) and not m.merged for m in wrapped)
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        ref = LLM.load(base, device="cpu", adapter=path).model(ids)
        err = (model(ids) - ref).abs().max() / ref.abs().max()
    assert err < 0.25


# --- `lmstack serve --lora` -------------------------------------------------------------------------------
def serve_error(capsys, *flags: str) -> str:
    assert main(["serve", "--device", "cpu", "--no-embeddings", *flags]) == 2
    return capsys.readouterr().err


def test_bad_lora_flags_stop_the_server_at_start(capsys, tiny_checkpoint, adapters, tmp_path):
    m = ["-m", f"tiny={tiny_checkpoint}"]
    sql = adapters["sql"]
    assert "--lora 'sql' is not NAME=DIR" in serve_error(capsys, *m, "--lora", "sql")
    assert "is not NAME=DIR" in serve_error(capsys, *m, "--lora", f"={sql}")
    err = serve_error(capsys, *m, "--lora", f"sql={tmp_path / 'missing'}")
    assert "--lora sql=" in err and "does not exist; pass a LoRA adapter folder in PEFT format" in err
    assert "has no adapter_config.json" in serve_error(capsys, *m, "--lora", f"sql={tmp_path}")
    err = serve_error(capsys, *m, "--lora", f"sql={sql}", "--lora", f"sql={adapters['poem']}")
    assert "two adapters are named 'sql'; give each a different NAME" in err
    two = [*m, "-m", f"other={tiny_checkpoint}"]
    assert "name the base as BASE:NAME=DIR" in serve_error(capsys, *two, "--lora", f"sql={sql}")
    assert "names a base model that is not served" in serve_error(capsys, *m, "--lora", f"nope:sql={sql}")


def test_an_adapter_for_another_base_model_stops_the_server(capsys, tiny_checkpoint, tmp_path):
    other = make_adapter(str(tiny_checkpoint), tmp_path / "other", ["q_proj"], 0, "some-other-model")
    err = serve_error(capsys, "-m", f"tiny={tiny_checkpoint}", "--lora", f"x={other}")
    assert f"--lora x={other}: the adapter was trained on 'some-other-model'" in err
    assert f"Pass an adapter trained on {tiny_checkpoint}." in err
    config = json.loads((other / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    err = serve_error(capsys, "-m", str(tiny_checkpoint), "--lora", f"x={other}")
    assert "--lora x=" in err and "matches no linear layer" in err


@pytest.mark.slow
def test_cli_serves_adapters_by_name(tiny_checkpoint, adapters, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, LMSTACK_HOME=str(tmp_path))
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "-m", f"tiny={tiny_checkpoint}", "--device", "cpu",
           "--lora", f"sql={adapters['sql']}", "--lora", f"poem={adapters['poem']}", "--port", str(port),
           "--no-embeddings", "--log-level", "warning"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # the banner's last line: listening
                if "choices[0].message.content" in line:
                    break
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            assert {m.id for m in client.models.list().data} == {"tiny", "tiny:sql", "tiny:poem"}
            merged = LLM.load(str(tiny_checkpoint), device="cpu", adapter=adapters["poem"])
            _, ref = greedy_reference(merged, PROMPT, 8, chat=False, ignore_eos=True)
            got = client.completions.create(
                model="tiny:poem", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            assert got.choices[0].text == ref.text
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
