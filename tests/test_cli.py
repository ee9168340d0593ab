"""The real `lmstack` command, run as a subprocess, on a tiny local checkpoint and on the packaged model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.config import NAMED_CONFIGS


def run_cli(*args: str, env_home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, LMSTACK_HOME=str(env_home))
    return subprocess.run(
        [sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_models_lists_every_named_model(tmp_path):
    r = run_cli("models", env_home=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma-3-270m"):
        assert name in r.stdout
        assert name in NAMED_CONFIGS  # the hub table and the config table agree
    assert "pip install" in r.stdout


def test_generate_on_local_checkpoint_is_deterministic(tiny_checkpoint, tmp_path):
    args = ("generate", "-m", str(tiny_checkpoint), "hello", "--max-new-tokens", "8", "--temperature", "0")
    a = run_cli(*args, env_home=tmp_path)
    b = run_cli(*args, env_home=tmp_path)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_generate_int8_and_seeded_sampling(tiny_checkpoint, tmp_path):
    args = ("generate", "-m", str(tiny_checkpoint), "The capital", "--raw", "--max-new-tokens", "6")
    r1 = run_cli(
        *args, "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--dtype", "int8", env_home=tmp_path
    )
    r2 = run_cli(
        *args, "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--dtype", "int8", env_home=tmp_path
    )
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout == r2.stdout


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--temperature", "-1"), "temperature"),
        (("--top-p", "1.5"), "top_p"),
        (("--top-k", "-2"), "top_k"),
        (("--max-new-tokens", "100000"), "context"),
    ],
)
def test_generate_bad_input_is_a_clear_error(tiny_checkpoint, tmp_path, extra, needle):
    r = run_cli("generate", "-m", str(tiny_checkpoint), "hello", *extra, env_home=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_unknown_model_lists_known_names(tmp_path):
    r = run_cli("generate", "-m", "no-such-model", "hi", env_home=tmp_path)
    assert r.returncode == 2
    assert "qwen2.5-coder-0.5b-instruct" in r.stderr and "Traceback" not in r.stderr


def test_chat_reset_and_exit(tiny_checkpoint, tmp_path):
    env = dict(os.environ, LMSTACK_HOME=str(tmp_path))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmstack.cli",
            "chat",
            "-m",
            str(tiny_checkpoint),
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        input="hi\n/reset\nhello again\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "(history cleared)" in r.stdout


def test_serve_takes_the_engines_speculative_options():
    from lmstack.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--speculative", "prompt_lookup", "--num-speculative-tokens", "3"]
    )
    assert (args.speculative, args.num_speculative_tokens) == ("prompt_lookup", 3)
    assert build_parser().parse_args(["serve"]).speculative is None
    args = build_parser().parse_args(["serve", "--speculative", "draft_model", "--draft-model", "smollm2"])
    assert (args.speculative, args.draft_model) == ("draft_model", "smollm2")


def test_serve_refuses_a_draft_model_without_its_flag(tmp_path):
    r = run_cli("serve", "--speculative", "draft_model", env_home=tmp_path)
    assert r.returncode != 0 and "--draft-model go together" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(tmp_path):
    from lmstack.api import default_home

    home = Path(os.environ.get("LMSTACK_HOME") or default_home())  # reuse the conversion cache
    r = run_cli(
        "generate",
        "-m",
        "qwen2.5-coder-0.5b-instruct",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "32",
        env_home=home,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
