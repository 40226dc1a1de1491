import json
import shutil
import subprocess
import sys

import pytest

from labkit import cli, evaluate
from labkit.pipeline import PRESETS, RunConfig, run
from labkit.stage import history_rows


def test_info_reports_dtype_cache_and_dataset_counts():
    d = cli.info()
    assert d["dtype"] in ("bfloat16", "float32")
    assert d["dataset"]["split"]["sft"] >= 200 and d["dataset"]["demonstrations"] >= 200
    out = subprocess.run([sys.executable, "-m", "labkit", "info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["versions"]["trl"].startswith("1.16")


def test_presets_and_validation():
    assert set(PRESETS) == {"tiny", "cpu", "gpu"}
    cfg = RunConfig.from_preset("tiny", out_dir="x", rounds=2)
    assert cfg.model == "tiny" and cfg.rounds == 2 and cfg.out_dir == "x"
    with pytest.raises(ValueError, match="unknown preset"):
        RunConfig.from_preset("huge")
    with pytest.raises(ValueError, match="k must lie"):
        RunConfig(k=12)
    # a misspelt stage override fails at once, naming the valid keys
    with pytest.raises(ValueError, match=r"RunConfig.ppo has unknown key\(s\) \['stpes'\].*PPOConfig knows:.*'steps'"):
        RunConfig(ppo=dict(stpes=3))
    with pytest.raises(ValueError, match="RunConfig.rm has unknown key"):
        RunConfig(rm=dict(lr=1e-4))
    with pytest.raises(ValueError, match=r"labelers_per_prompt must lie in 1..n_labelers \(5\)"):
        RunConfig(labelers_per_prompt=6)


def test_win_rate_counts_ties_half_and_gives_an_interval():
    recs = [{"id": str(i), "prompt": "Say yes.", "category": "other", "checks": [{"type": "lowercase"}]}
            for i in range(4)]
    a = ["yes", "yes", "Yes", "yes"]
    b = ["Yes", "yes", "Yes", "No"]
    w = evaluate.win_rate(a, b, recs, judge=lambda r, y: float(y.islower()))
    assert (w["wins"], w["ties"], w["losses"]) == (2, 2, 0)
    assert w["win_rate"] == pytest.approx(0.75)
    lo, hi = w["ci95"]
    assert lo < 0.75 < hi <= 1.0


def test_best_of_n_curve_picks_the_rm_favourite():
    rm = [[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.8, 0.1]]
    gold = [[1.0, 0.0, 0.5, 0.5], [0.2, 0.4, 0.6, 0.8]]
    rows = evaluate.best_of_n_curve(rm, gold, ns=(1, 2, 4))
    assert [r["kl"] for r in rows] == pytest.approx([0.0, 0.693147 - 0.5, 1.386294 - 0.75], abs=1e-5)
    assert rows[0]["gold"] == pytest.approx((1.0 + 0.2) / 2)   # n=1: the first sample
    assert rows[2]["rm"] == pytest.approx((0.9 + 0.8) / 2)     # n=4: the RM's best
    assert rows[2]["gold"] == pytest.approx((0.0 + 0.6) / 2)   # ... which gold likes less


@pytest.mark.slow
def test_tiny_run_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig.from_preset("tiny", out_dir=str(out))
    metrics = run(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["gold_mean"].keys() == {"base", "sft", "ppo_r1"}
    for stage in ("eval_base", "sft", "rankings_r1", "rm_r1", "ppo_r1", "eval_ppo_r1", "compare"):
        assert saved["stage_wall_s"][stage] > 0
    assert saved["stages"]["rankings_r1"]["rankings"] == 16 * 5  # every labeler ranks every prompt
    rm_data = json.loads((out / "rm_r1" / "metrics.json").read_text())
    assert rm_data["data/n_rankings"] == 80 and rm_data["data/n_merged"] <= 16  # merged per prompt
    assert 0 <= saved["comparisons"]["gold/ppo_r1_vs_sft"]["win_rate"] <= 1
    html = (out / "report.html").read_text()
    assert "Win rates" in html and "Sample responses" in html
    assert (out / "ppo_r1" / "model").is_dir() and (out / "feedback.sqlite").exists()
    for stage in ("sft", "rm_r1", "ppo_r1"):  # the stage contract's files
        for name in ("config.json", "metrics.json", "history.json", "dashboard.html"):
            assert (out / stage / name).exists(), (stage, name)
    assert not list(out.glob("*/checkpoint*"))  # a finished run drops its resume checkpoints
    # a second invocation resumes: every stage is skipped, nothing is ranked twice
    n_before = saved["stages"]["rankings_r1"]["rankings"]
    again = run(RunConfig.from_preset("tiny", out_dir=str(out)))
    assert again["stage_wall_s"] == metrics["stage_wall_s"]
    from labkit.feedback import FeedbackStore
    assert len(FeedbackStore(out / "feedback.sqlite").rankings()) == n_before


def test_first_choices_fine_tune_before_ppo_and_are_judged_against_sft(tmp_path, monkeypatch):
    """first_choices=True: SFT on the pooled rankings' first choices; PPO starts there with it as reference."""
    import labkit.sft
    from labkit.feedback import FeedbackStore
    from labkit.rankings import first_choices

    out = tmp_path / "run"
    kw = dict(out_dir=str(out), first_choices=True, first_choices_sft=dict(max_steps=2), eval_limit=6,
              ppo=dict(steps=1))
    # the tiny model never stops within 16 tokens: skipping cut-off answers leaves nothing to teach
    with pytest.raises(RuntimeError, match="every ranked answer was cut off at 16 tokens"):
        run(RunConfig.from_preset("tiny", **kw))
    taught, original = [], labkit.sft.train_sft

    def spy(config):
        taught.append(config)
        return original(config)

    monkeypatch.setattr(labkit.sft, "train_sft", spy)
    metrics = run(RunConfig.from_preset("tiny", first_choices_cut="keep", **kw))  # resumes after the RM
    assert [c.out_dir for c in taught] == [str(out / "first_choices_r1")]  # SFT and the RM were not redone
    store = FeedbackStore(out / "feedback.sqlite")
    assert taught[0].demonstrations == first_choices(store.to_kway(), policy="keep")  # every prompt's first choice
    assert len(taught[0].demonstrations) == 16 and taught[0].learning_rate == 1e-4 and taught[0].max_steps == 2
    assert taught[0].model == str(out / "sft" / "model")
    ppo = json.loads((out / "ppo_r1" / "config.json").read_text())
    assert ppo["model"] == ppo["reference"] == str(out / "first_choices_r1" / "model")
    assert metrics["gold_mean"].keys() == {"base", "sft", "first_choices_r1", "ppo_r1"}
    comps = metrics["comparisons"]
    for key in ("gold/first_choices_r1_vs_sft", "gold/ppo_r1_vs_first_choices_r1", "rm/first_choices_r1_vs_sft"):
        assert 0 <= comps[key]["win_rate"] <= 1, key
    assert comps["kl_to_sft/first_choices_r1"] > 0 and comps["kl_to_sft"] > 0
    assert "outside/first_choices_r1_minus_sft" in metrics["outside_judge"]["paired"]
    assert "first_choices_r1: " in (out / "report.html").read_text()  # its KL, beside PPO's

    # PPO-ptx on the same picks: PPO trained again (the fine-tune is kept), its LM term on the picks
    shutil.rmtree(out / "ppo_r1")
    state = json.loads((out / "state.json").read_text())
    del state["stages"]["ppo_r1"]
    (out / "state.json").write_text(json.dumps(state))
    import labkit.ppo

    trained, original_ppo = [], labkit.ppo.train_ppo
    monkeypatch.setattr(labkit.ppo, "train_ppo", lambda config: trained.append(config) or original_ppo(config))
    run(RunConfig.from_preset("tiny", first_choices_cut="keep", ptx_source="first_choices",
                              **{**kw, "ppo": dict(steps=1, ptx_coef=0.5)}))
    assert len(taught) == 1 and len(trained) == 1  # the fine-tune was not redone
    assert trained[0].ptx_coef == 0.5 and trained[0].ptx_texts == taught[0].demonstrations
    assert history_rows(out / "ppo_r1")[0]["loss/ptx"] > 0
    with pytest.raises(ValueError, match="ptx_source='first_choices' needs first_choices=True"):
        RunConfig(ptx_source="first_choices")
    with pytest.raises(ValueError, match="RunConfig.first_choices_sft has unknown key"):
        RunConfig(first_choices_sft=dict(epoch=1))
    with pytest.raises(ValueError, match="first_choices_cut must be one of"):
        RunConfig(first_choices_cut="drop")


@pytest.mark.slow
def test_ensure_builds_what_earlier_notebooks_leave_and_reuses_it(tmp_path):
    from labkit.pipeline import ensure
    from labkit.reward import load_reward_model

    settings = dict(model="tiny", rm_prompts=8, sample_max_new_tokens=8, sft=dict(max_steps=2),
                    rm=dict(max_steps=2, batch_size=4))
    built = ensure(tmp_path, upto="rm", **settings)
    assert built["sft"] == str(tmp_path / "sft" / "model") and "ppo" not in built
    rm, _ = load_reward_model(built["rm"], dtype="float32", device="cpu")
    n_rankings = len(built["store"].rankings())
    assert n_rankings >= 8
    again = ensure(tmp_path, upto="rm", **settings)  # everything is there: nothing is redone
    assert again["rm"] == built["rm"] and len(again["store"].rankings()) == n_rankings

    # a run folder handed on (copied, the original gone) uses its own models, not the recorded paths
    moved = tmp_path.parent / (tmp_path.name + "_handed_on")
    shutil.copytree(tmp_path, moved)
    shutil.rmtree(tmp_path / "sft")
    shutil.rmtree(tmp_path / "rm_r1")
    there = ensure(moved, upto="rm", **settings)
    assert there["sft"] == str(moved / "sft" / "model") and there["rm"] == str(moved / "rm_r1" / "model")
    assert len(there["store"].rankings()) == n_rankings  # nothing was trained or ranked again


def test_an_ensemble_of_reward_models_feeds_ppo_their_mean(tmp_path):
    """rm_ensemble=2: a second RM on the same rankings with the next seed; PPO gets both."""
    import json

    from pathlib import Path

    from labkit import pipeline
    from labkit.pipeline import ensure

    built = ensure(tmp_path, upto="ppo", model="tiny", rm_prompts=6, sample_max_new_tokens=6, rm_ensemble=2,
                   sft=dict(max_steps=1), rm=dict(max_steps=2, batch_size=4),
                   ppo=dict(steps=1, batch_size=4, mini_batch_size=4, micro_batch_size=4, max_new_tokens=4,
                            gold_every=0, sample_every=0, save_every=0))
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("rm_r1", "rm_r1_m1", "ppo_r1")]
    assert [c["seed"] for c in configs[:2]] == [0, 1]
    assert configs[2]["reward_model"] == [str(tmp_path / "rm_r1" / "model"), str(tmp_path / "rm_r1_m1" / "model")]
    assert pipeline.reward_model_dirs(tmp_path, 1) == [Path(p) for p in configs[2]["reward_model"]]  # found again
    assert built["rm"] == str(tmp_path / "rm_r1" / "model")  # the first member: the report's RM, the value's start
    with pytest.raises(ValueError, match="rm_ensemble"):
        RunConfig(rm_ensemble=0)


def test_ppo_against_the_gold_scorer_measures_the_ceiling(tmp_path):
    """ppo_reward="gold": PPO is paid the gold score of each answer, no RM; the RM still trains (it judges)."""
    import json

    from labkit.data import load_prompts
    from labkit.labelers import GoldLabeler, bradley_terry_scale
    from labkit.pipeline import ensure

    built = ensure(tmp_path, upto="ppo", model="tiny", rm_prompts=6, sample_max_new_tokens=6, ppo_reward="gold",
                   sft=dict(max_steps=1), rm=dict(max_steps=1, batch_size=4),
                   ppo=dict(steps=2, batch_size=4, mini_batch_size=4, micro_batch_size=4, max_new_tokens=4,
                            missing_eos_penalty=0.0, gold_every=0, sample_every=1, save_every=0))
    assert json.loads((tmp_path / "ppo_r1" / "config.json").read_text())["reward_model"] is None
    assert built["rm"] == str(tmp_path / "rm_r1" / "model")
    logged = [json.loads(line) for line in (tmp_path / "ppo_r1" / "samples.jsonl").read_text().splitlines()]
    records = {r["prompt"]: r for r in load_prompts("ppo")}
    assert len(logged) == 4
    for row in logged:  # the score PPO saw is the gold score of that answer to that prompt
        gold = GoldLabeler().score(records[row["prompt"]], row["response"])
        assert row["score"] == pytest.approx(bradley_terry_scale() * gold, abs=1e-5)  # on a reward model's scale
    with pytest.raises(ValueError, match="ppo_reward"):
        RunConfig(ppo_reward="labelers")


def test_a_stopped_stage_stops_labkit_run_with_its_message(tmp_path, monkeypatch, capsys):
    import labkit.sft

    def stopped_sft(config):
        return {"out_dir": config.out_dir, "model_dir": None, "stopped": "non-finite",
                "message": "non-finite training loss at step 3"}

    monkeypatch.setattr(labkit.sft, "train_sft", stopped_sft)
    monkeypatch.setattr("labkit.pipeline.eval_stage", lambda *a: {})
    assert cli.main(["run", "--preset", "tiny", "--out", str(tmp_path / "run")]) == 1
    assert "sft stopped (non-finite): non-finite training loss at step 3" in capsys.readouterr().err


def test_labkit_run_turns_ptx_on_from_the_command_line(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("labkit.pipeline.run", lambda cfg: seen.append(cfg) or {"wall_s": 0})
    out = str(tmp_path / "run")
    assert cli.main(["run", "--preset", "tiny", "--out", out, "--ptx-coef", "0.3", "--ptx-source", "base_answers"]) == 0
    cfg = seen[0]
    assert cfg.ppo["ptx_coef"] == 0.3 and cfg.ptx_source == "base_answers"
    assert cfg.ppo["steps"] == PRESETS["tiny"]["ppo"]["steps"]  # the rest of the preset's PPO settings stay
    assert cli.main(["run", "--preset", "tiny", "--out", out]) == 0
    assert seen[1].ppo.get("ptx_coef", 0) == 0 and seen[1].ptx_source == "demonstrations"  # the preset: off
    with pytest.raises(SystemExit):
        cli.main(["run", "--preset", "tiny", "--out", out, "--ptx-coef", "-1"])
    assert "--ptx-coef must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--preset", "tiny", "--out", out, "--ptx-coef", "1", "--ptx-source", "first_choices"])
    assert "ptx_source='first_choices' needs first_choices=True" in capsys.readouterr().err
    assert len(seen) == 2  # nothing ran
    assert cli.main(["run", "--preset", "tiny", "--out", out, "--first-choices", "--ptx-coef", "1",
                     "--ptx-source", "first_choices"]) == 0
    assert seen[2].first_choices and seen[2].ptx_source == "first_choices" and seen[2].ppo["ptx_coef"] == 1.0
    assert "ptx_prompt_loss" not in seen[2].ppo  # PPOConfig's default: the loss on prompt and response
    assert cli.main(["run", "--preset", "tiny", "--out", out, "--first-choices", "--ptx-coef", "1",
                     "--ptx-source", "first_choices", "--ptx-response-only"]) == 0
    assert seen[3].ppo["ptx_prompt_loss"] is False and seen[3].ppo["ptx_coef"] == 1.0


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Wrap ``owner.name(model, tokenizer, records, ...)``: the list grows by len(records) per call."""
    calls, real = [], getattr(owner, name)

    def counting(*args, **kw):
        calls.append(len(args[2]))
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_starting_model_answers_are_cached_across_runs(tmp_path, monkeypatch):
    """A second run of the same starting model, prompts and settings reuses its greedy answers;
    another length limit or changed weights compute them again."""
    from labkit import models, pipeline

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    model, tok = models.load_model("tiny")
    folder = tmp_path / "start"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    records = [{"id": f"e-{i}", "prompt": p} for i, p in enumerate(["Name a colour.", "Say hi.", "Count to 3."])]
    calls = count_calls(monkeypatch, evaluate, "answer")

    def answers(out, **kw):
        cfg = RunConfig.from_preset("tiny", out_dir=str(tmp_path / out), model=str(folder), **kw)
        return pipeline._answers(pipeline.Run(cfg), str(folder), records, {}, cache=True)

    first = answers("a")
    assert answers("b") == first and calls == [3]  # the second run read the cache
    answers("c", eval_max_new_tokens=5)
    assert calls == [3, 3]  # another setting: computed again
    model.save_pretrained(folder)  # new weight files (time stamps)
    answers("d")
    assert calls == [3, 3, 3]
    assert pipeline._answer_cache_path(RunConfig.from_preset("tiny"), "tiny", records) is None


def test_rankings_stage_ranks_saved_samples_again_and_asks_each_labeler_once(tmp_path, monkeypatch):
    """A rankings stage that runs again on the same policy weights and settings ranks the saved
    samples instead of sampling anew; labelers_per_prompt labelers rank every prompt."""
    from labkit import generation, models, pipeline
    from labkit.feedback import FeedbackStore

    model, tok = models.load_model("tiny")
    policy = tmp_path / "policy"
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    calls = count_calls(monkeypatch, generation, "sample_k")

    def rankings(**kw):
        cfg = RunConfig.from_preset("tiny", out_dir=str(tmp_path / "run"), rm_prompts=6, overlap=0.0, **kw)
        store = FeedbackStore(tmp_path / f"fb{len(list(tmp_path.glob('fb*')))}.sqlite")
        result = pipeline.rankings_stage(pipeline.Run(cfg), 1, str(policy), store)
        return result, store.rankings()

    first, stored = rankings(labelers_per_prompt=1)
    assert calls == [6] and first["rankings"] == 6 and len(stored) == 6
    second, stored_again = rankings(labelers_per_prompt=3)
    assert calls == [6]  # the saved samples, ranked again
    assert second["rankings"] == 18 and len({r["annotator"] for r in stored_again}) == 5
    assert [r["responses"] for r in stored_again[::3]] == [r["responses"] for r in stored]
    assert second["inter_labeler_agreement"] is not None  # the first two labelers of each prompt
    rankings(k=3)  # another setting: sampled anew
    assert calls == [6, 6]


def test_rounds_rank_new_prompts_while_the_split_lasts():
    """Each round draws rm_prompts the earlier rounds did not rank; round 1 is the balanced
    sample a one-round run takes; rm_prompts=None ranks the whole split every round."""
    from labkit.data import balanced_sample, load_prompts
    from labkit.pipeline import round_prompts

    split = load_prompts("rm")
    half = len(split) // 2 + 1
    cfg = RunConfig.from_preset("cpu", out_dir="x", rm_prompts=half)
    ids = [{p["id"] for p in round_prompts(cfg, k)} for k in (1, 2, 3)]
    assert [p["id"] for p in round_prompts(cfg, 1)] == [p["id"] for p in balanced_sample(split, half, seed=1)]
    assert len(ids[0]) == half and len(ids[1]) == len(split) - half  # round 2 takes what is left
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == {p["id"] for p in split}
    assert len(ids[2]) == half  # the split is used up: round 3 draws from all of it again
    whole = RunConfig.from_preset("cpu", out_dir="x")
    assert [p["id"] for p in round_prompts(whole, 2)] == [p["id"] for p in split]


def test_drop_checkpoints_frees_the_resume_state_and_keeps_the_models(tmp_path):
    from labkit.pipeline import drop_checkpoints

    for rel, size in (("sft/checkpoint-26/optimizer.pt", 300), ("sft/model/model.safetensors", 100),
                      ("ppo_r1/checkpoint/model.safetensors", 200), ("ppo_r1/checkpoint.old/x", 50),
                      ("ppo_r1/model/model.safetensors", 100), ("rm_r1/model/reward_model.json", 10)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"0" * size)
    assert drop_checkpoints(tmp_path) == 550
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["ppo_r1/model/model.safetensors", "rm_r1/model/reward_model.json", "sft/model/model.safetensors"]
    assert drop_checkpoints(tmp_path) == 0
