"""The data split and the metrics of eval/finetune_demos.py, against values worked out by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lmstack.data.corpora import chatterbot_pairs
from lmstack.generate import GenerationResult

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "finetune_demos.py"
_spec = importlib.util.spec_from_file_location("finetune_demos", SCRIPT)
assert _spec is not None and _spec.loader is not None
demos = importlib.util.module_from_spec(_spec)
sys.modules["finetune_demos"] = demos  # dataclasses look their module up by name
_spec.loader.exec_module(demos)


def qa(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def result(text: str, ids: list[int], reason: str = "stop") -> GenerationResult:
    return GenerationResult(text, ids, reason, 3, len(ids), None)  # type: ignore[arg-type]


def test_heldout_prompts_never_reach_training_in_any_spelling() -> None:
    convs = [
        qa("What is AI?", "a"),
        qa("what is ai", "b"),  # the same prompt, other case and punctuation
        qa("Hello", "hi"),
        [*qa("Hi", "hey"), *qa("What is AI?", "c")],  # a later user turn counts too
        qa("Bye", "long answer " * 20),  # not eligible: never held out
    ]
    for seed in range(5):
        train, held = demos.split_heldout(convs, 2, seed, eligible=lambda c: len(c[1]["content"]) < 50)
        assert len(held) == 2
        held_keys = {demos.text_key(convs[i][0]["content"]) for i in held}
        assert len(held_keys) == 2 and demos.text_key("Bye") not in held_keys
        for i in train:
            assert not {demos.text_key(m["content"]) for m in convs[i] if m["role"] == "user"} & held_keys
        assert 4 in train  # the ineligible conversation always trains
    every = lambda c: True  # noqa: E731
    assert demos.split_heldout(convs, 2, 0, every) == demos.split_heldout(convs, 2, 0, every)  # seeded


def test_split_refuses_more_prompts_than_there_are() -> None:
    with pytest.raises(ValueError, match="only 2 eligible prompts, 3 asked for"):
        demos.split_heldout([qa("a", "x"), qa("b", "y")], 3, 0, lambda c: True)


def test_chatterbot_with_topics_is_chatterbot_pairs_with_a_topic() -> None:
    items = demos.chatterbot_with_topics()
    assert [c for _, c in items] == chatterbot_pairs()
    assert {"AI", "trivia", "tech support"} <= {t for t, _ in items}


def test_ends_with_counts_only_the_given_stop_token() -> None:
    results = [result("a", [5, 1]), result("b", [5, 106]), result("c", [5, 6], "length"), result("d", [1])]
    assert demos.ends_with(results, 1) == 0.5  # "b" stopped on another stop token, "c" hit the cap


def test_parse_json_answer() -> None:
    keys = ("topic", "answer")
    want = {"topic": "AI", "answer": "yes"}
    assert demos.parse_json_answer(' {"topic": "AI", "answer": "yes"}\n', keys) == want
    fenced = '```json\n{"answer": "yes", "topic": "AI"}\n```'
    assert demos.parse_json_answer(fenced, keys) is None
    assert demos.parse_json_answer(fenced, keys, fenced=True) == want
    for bad in (
        '{"topic": "AI"}',  # a key missing
        '{"topic": "AI", "answer": "yes", "why": "x"}',  # a key too many
        '{"topic": "AI", "answer": 3}',  # not a string
        '{"topic": "", "answer": "yes"}',  # empty
        '["AI", "yes"]',
        '{"topic": "AI", "answer": "yes"} and more',
        "Sure! Here it is.",
    ):
        assert demos.parse_json_answer(bad, keys, fenced=True) is None, bad


def test_reward_accuracy_counts_ties_half() -> None:
    reference = torch.tensor([[-3.0, -4.0], [-5.0, -2.0], [-1.0, -1.0], [-2.0, -6.0]])  # (N, 2)
    untrained = demos.reward_accuracy(reference, reference, beta=0.1)
    assert untrained == {"reward_accuracy": 0.5, "strict_wins": 0.0, "ties": 1.0, "mean_margin": 0.0}
    policy = reference + torch.tensor([[1.0, -1.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
    # margins beta * ((pi_c - ref_c) - (pi_r - ref_r)): 0.2, -0.1, 0.2, 0
    got = demos.reward_accuracy(policy, reference, beta=0.1)
    assert got["strict_wins"] == 0.5 and got["ties"] == 0.25 and got["reward_accuracy"] == 0.625
    assert got["mean_margin"] == pytest.approx(0.075)


def test_finetune_command_is_the_cli_with_the_recipe() -> None:
    cmd = demos.finetune_command(demos.DPO, Path("/tmp/d.jsonl"), Path("/tmp/v.jsonl"), demos.WORK / "x")
    assert cmd[:5] == ["lmstack", "finetune", "-m", "smollm2-135m-instruct", "--method"]
    assert cmd[cmd.index("--beta") + 1] == "0.1" and cmd[cmd.index("--out") + 1] == "out/finetune-demos/x"
    from lmstack.cli import build_parser

    parsed = build_parser().parse_args(cmd[1:])  # every flag exists in the CLI
    assert parsed.max_steps == demos.DPO.steps and parsed.targets == list(demos.DPO.targets)


def test_main_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["dpo", "--steps", "0"], "--steps must be >= 1"),
        (["dpo", "--prompts", "1"], ">= 2"),
    ):
        with pytest.raises(SystemExit):
            demos.main(argv)
        assert message in capsys.readouterr().err
