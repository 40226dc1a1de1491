"""Stage 1 SFT: data format, completion-only masking, precision, a tiny smoke run and resume."""

import json
import os
import signal

import pytest
import torch

from labkit import models
from labkit.stage import read_history, trainer_guards
from labkit.sft import (SFTConfig, build_examples, expected_tokens, make_trainer, resolve_precision,
                        split_demonstrations, train_sft)

# Short demonstrations keep the tiny runs fast; the last one is longer than max_length below.
DEMOS = [
    {"prompt": "Say hello.", "response": "Hello!"},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"prompt": "What is 2 + 2?", "response": "2 + 2 = 4."},
    {"prompt": "Reply with yes.", "response": "yes"},
    {"prompt": "Give one fruit.", "response": "An apple."},
    {"prompt": "Write a long story.", "response": "Once upon a time " * 30},
]
TINY_RUN = dict(model="tiny", demonstrations=DEMOS, batch_size=2, max_length=48, eval_fraction=0.2,
                learning_rate=3e-3, warmup=0, lr_scheduler="constant", dashboard=False, progress=False)


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(2)
    return models.load_tokenizer()


def test_examples_are_exactly_what_generation_sees(tok):
    ex = build_examples(tok, DEMOS[:1])[0]
    assert ex["prompt"] == models.format_prompt(tok, "Say hello.")
    assert ex["completion"] == "Hello!" + tok.eos_token
    ids, labels = expected_tokens(tok, ex)
    prompt_ids = tok(models.format_prompt(tok, "Say hello."), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert ids[-1] == tok.eos_token_id and ids[-1] != tok.pad_token_id
    assert tok.decode(ids[len(prompt_ids):]) == "Hello!" + tok.eos_token


def test_feedback_store_records_with_completion_are_accepted(tok):
    ex = build_examples(tok, [{"prompt": "p", "completion": "c"}])[0]
    assert ex["completion"] == "c" + tok.eos_token


def test_bad_demonstrations_raise(tok):
    with pytest.raises(ValueError, match="empty response"):
        build_examples(tok, [{"prompt": "p", "response": "  "}])
    with pytest.raises(ValueError, match="no 'response'"):
        build_examples(tok, [{"prompt": "p"}])
    with pytest.raises(ValueError, match="no 'prompt'"):
        build_examples(tok, [{"response": "r"}])


def test_split_is_seeded_and_disjoint():
    demos = [{"prompt": str(i), "response": "r"} for i in range(20)]
    a_train, a_eval = split_demonstrations(demos, 0.1, seed=0)
    b_train, b_eval = split_demonstrations(demos, 0.1, seed=0)
    assert a_eval == b_eval and len(a_eval) == 2 and len(a_train) == 18
    assert {d["prompt"] for d in a_train}.isdisjoint({d["prompt"] for d in a_eval})
    assert split_demonstrations(demos, 0.0, seed=0)[1] == []


def test_config_validation():
    with pytest.raises(ValueError):
        SFTConfig(precision="fp8")
    with pytest.raises(ValueError):
        SFTConfig(eval_fraction=1.0)
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if models.cpu_has_fast_bf16() else "fp32")


def test_completion_only_masking_in_trl_dataset(tmp_path):
    """TRL's tokenised examples equal ours: prompt tokens get label -100, response + EOS are learned."""
    trainer, info = make_trainer(SFTConfig(out_dir=str(tmp_path), **TINY_RUN))
    tok = trainer.processing_class
    assert info["n_truncated"] == 1 and info["n_train"] + info["n_eval"] == len(DEMOS)
    for row in trainer.train_dataset:
        prompt = tok.decode(row["input_ids"]).split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n"
        ex = [e for e in build_examples(tok, DEMOS) if e["prompt"] == prompt][0]
        ids, labels = expected_tokens(tok, ex)
        assert row["input_ids"] == ids[:48]
        assert row["labels"] == labels[:48]
        n_prompt = len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
        assert all(label == -100 for label in row["labels"][:n_prompt])
        assert all(label != -100 for label in row["labels"][n_prompt:])


def _linear_output_dtypes(model):
    seen = []
    layer = model.model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_really_autocasts(tmp_path, precision, dtype):
    trainer, info = make_trainer(SFTConfig(out_dir=str(tmp_path), max_steps=1, eval_fraction=0.0,
                                           save_steps=100, precision=precision,
                                           **{k: v for k, v in TINY_RUN.items() if k != "eval_fraction"}))
    seen = _linear_output_dtypes(trainer.model)
    trainer.train()
    assert info["precision"] == precision
    assert seen and set(seen) == {dtype}  # matmuls ran in bf16 (or fp32) during the step
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_tiny_sft_smoke_loss_down_and_folder_loads(tmp_path):
    before = {k: v.clone() for k, v in models.load_model("tiny", dtype="float32")[0].state_dict().items()}
    result = train_sft(SFTConfig(out_dir=str(tmp_path / "sft"), max_steps=8, save_steps=100, **TINY_RUN))
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    losses = [v for _, v in read_history(tmp_path / "sft")["loss/train"]]
    assert len(losses) == 8 and all(l == l for l in losses)  # finite (no NaN)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5  # clearly down on 5 memorisable demos
    assert metrics["eval/loss"] < metrics["eval/loss_start"]
    assert metrics["data/n_truncated"] == 1 and metrics["train/steps"] == 8
    assert result["stopped"] is None and result["model_dir"] == str(tmp_path / "sft" / "model")
    model, tok = models.load_model(result["model_dir"], dtype="float32")
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
    for name in ("config.json", "history.json", "dashboard.html"):
        assert (tmp_path / "sft" / name).exists()
    assert tok.eos_token_id == models.load_tokenizer().eos_token_id


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    """2 steps + resume to 4 steps gives the same weights as 4 uninterrupted steps."""
    cfg = dict(TINY_RUN, eval_fraction=0.0, save_steps=2)
    train_sft(SFTConfig(out_dir=str(tmp_path / "full"), max_steps=4, **cfg))
    train_sft(SFTConfig(out_dir=str(tmp_path / "split"), max_steps=2, **cfg))
    assert (tmp_path / "split" / "checkpoint-2").exists()
    train_sft(SFTConfig(out_dir=str(tmp_path / "split"), max_steps=4, **cfg))
    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert metrics["train/resumed_from"].endswith("checkpoint-2") and metrics["train/steps"] == 4
    full = models.load_model(str(tmp_path / "full" / "model"), dtype="float32")[0].state_dict()
    split = models.load_model(str(tmp_path / "split" / "model"), dtype="float32")[0].state_dict()
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-4, atol=1e-5)


def test_feedback_store_demonstrations_feed_sft(tmp_path, tok):
    feedback = pytest.importorskip("labkit.feedback")
    store = feedback.FeedbackStore(tmp_path / "fb.sqlite")
    store.add_demonstration("sft-0001", "Say hello.", "Hello!", annotator="ann")
    ex = build_examples(tok, store.demonstrations())
    assert ex == build_examples(tok, DEMOS[:1])


def test_non_finite_loss_stops_training_without_a_checkpoint():
    from types import SimpleNamespace

    guard = trainer_guards({"set": False})
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    guard.on_log(None, SimpleNamespace(global_step=3), control, logs={"loss": 2.0})
    assert not control.should_training_stop and guard.stopped is None
    guard.on_log(None, SimpleNamespace(global_step=4), control, logs={"loss": float("nan")})
    assert control.should_training_stop and not control.should_save and guard.stopped == "non-finite"
    assert "step 4" in guard.message


def test_a_raised_interrupt_flag_checkpoints_the_step_and_stops():
    from types import SimpleNamespace

    flag = {"set": False}
    guard = trainer_guards(flag)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    guard.on_step_end(None, SimpleNamespace(global_step=2), control)
    assert not control.should_training_stop and guard.stopped is None
    flag["set"] = True
    guard.on_step_end(None, SimpleNamespace(global_step=3), control)
    assert control.should_training_stop and control.should_save and guard.stopped == "interrupted"


def test_ctrl_c_during_sft_saves_a_checkpoint_and_returns_interrupted(tmp_path, monkeypatch):
    """A SIGINT in the middle of training ends the step, checkpoints it, and the run resumes from it."""
    from transformers import TrainerCallback

    class CtrlCAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = SFTConfig(out_dir=str(tmp_path / "sft"), max_steps=4, save_steps=100,
                    **dict(TINY_RUN, eval_fraction=0.0))
    trainer, info = make_trainer(cfg)
    trainer.add_callback(CtrlCAtStep2())
    monkeypatch.setattr("labkit.sft.make_trainer", lambda config: (trainer, info))
    result = train_sft(cfg)
    monkeypatch.undo()
    assert result["stopped"] == "interrupted" and result["model_dir"] is None
    assert (tmp_path / "sft" / "checkpoint-2").exists()
    resumed = train_sft(cfg)
    assert resumed["stopped"] is None and resumed["train/resumed_from"].endswith("checkpoint-2")


def test_every_embedded_demonstration_trains_on_the_generation_tokens(tmp_path):
    """TRL tokenises prompt + completion jointly; for all embedded demos that equals our split view."""
    data = pytest.importorskip("labkit.data")
    demos = data.load_demonstrations()
    trainer, info = make_trainer(SFTConfig(model="tiny", out_dir=str(tmp_path), eval_fraction=0.0,
                                           dashboard=False, progress=False), *models.load_model("tiny", dtype="float32"))
    tok = trainer.processing_class
    expected = {}
    for ex in build_examples(tok, demos):
        ids, labels = expected_tokens(tok, ex)
        expected[tuple(ids)] = labels
    assert len(trainer.train_dataset) == len(demos) and info["n_truncated"] == 0
    for row in trainer.train_dataset:
        assert expected[tuple(row["input_ids"])] == row["labels"]


def test_changed_demonstrations_start_fresh_and_the_same_ones_resume(tmp_path, capsys):
    """A finished run in out_dir is not resumed with other demonstrations: SFT starts over and says so."""
    from labkit.sft import inputs_fingerprint

    cfg = dict(TINY_RUN, eval_fraction=0.0, save_steps=2)
    out = tmp_path / "sft"
    first = train_sft(SFTConfig(out_dir=str(out), max_steps=2, **cfg))
    assert (out / "checkpoint-2").exists() and (out / "inputs.json").exists()
    # the same demonstrations and settings: resumed (nothing left to train)
    again = train_sft(SFTConfig(out_dir=str(out), max_steps=2, **cfg))
    assert again["train/resumed_from"].endswith("checkpoint-2")
    assert "starting fresh" not in capsys.readouterr().out
    # one more demonstration written: a fresh run on the new set, with a printed reason
    more = dict(cfg, demonstrations=DEMOS + [{"prompt": "Say bye.", "response": "Bye!"}])
    fresh = train_sft(SFTConfig(out_dir=str(out), max_steps=2, **more))
    assert "trained on other demonstrations or settings; starting fresh" in capsys.readouterr().out
    assert fresh["train/resumed_from"] is None and fresh["train/steps"] == 2
    assert fresh["data/fingerprint"] != first["data/fingerprint"]
    # a changed setting that alters the result counts too; max_steps (a longer run) does not
    assert inputs_fingerprint(SFTConfig(**more), more["demonstrations"]) != inputs_fingerprint(
        SFTConfig(**dict(more, learning_rate=1e-3)), more["demonstrations"])
    assert inputs_fingerprint(SFTConfig(**more), more["demonstrations"]) == inputs_fingerprint(
        SFTConfig(**dict(more, max_steps=9)), more["demonstrations"])
