"""``labkit run``: the whole InstructGPT pipeline on one machine, resumable stage by stage.

base eval -> SFT -> sample K responses per RM prompt -> simulated (+ human) rankings ->
reward model -> PPO -> eval, repeated ``rounds`` times for steps 2-3 (InstructGPT §3.1:
"steps 2 and 3 can be iterated continuously": new comparisons on the current policy, the RM
retrained on all comparisons so far, more PPO). Everything lands in ``runs/<name>/``:
models, ``feedback.sqlite``, ``metrics.json`` and a self-contained ``report.html``.

Opt-in (``first_choices``): before PPO, the policy is fine-tuned on the answers the pooled
rankings put first, and PPO starts from that model (Llama 2 fine-tuned on its RM's best of K
before PPO; here the labelers pick, which keeps the signal a small RM loses).

A stage that finished is recorded in ``state.json`` and skipped when the same folder is
run again, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit import evaluate, labelers, models
from labkit.rankings import CUT_POLICIES, first_choices, pair_stats, pooled_agreement
from labkit.report import json_dump, load_jsonl, write_run_report


@dataclass
class RunConfig:
    preset: str = "cpu"                 # tiny | cpu | gpu (see PRESETS)
    model: str = "smollm2-135m"         # base model: built-in name, folder or HF id
    out_dir: str = "runs/cpu"           # run folder
    rounds: int = 1                     # iterations of rankings -> RM -> PPO (InstructGPT §3.1)
    fresh: bool = False                 # ignore state.json and start over
    seed: int = 0                       # seeds sampling, labelers and every stage
    device: str = "auto"                # "auto", "cpu" or "cuda"
    k: int = 4                          # responses ranked per prompt (InstructGPT: 4..9)
    rm_prompts: int | None = None       # RM prompts per round, new ones each round while the split lasts;
                                        # None = the whole rm split every round
    rm_ensemble: int = 1                # reward models per round, trained on the same rankings with seeds
                                        # seed, seed+1, ...; PPO's reward is their mean (the value model starts as the first)
    ppo_reward: str = "rm"              # PPO's reward: "rm" (the round's reward model(s)) or "gold" (the gold
                                        # scorer itself, labelers.gold_reward: the ceiling a perfect RM of the
                                        # simulated labelers would give; a measurement, a room has no gold)
    n_labelers: int = 5                 # simulated labelers in the pool
    labelers_per_prompt: int = 1        # labelers of the pool who rank each prompt (with rm.consensus, the RM
                                        # trains on their merged ranking: less noise from any one labeler)
    overlap: float = 0.2                # share of prompts ranked by one more labeler (agreement)
    sample_max_new_tokens: int = 64     # response length when sampling for rankings
    sample_temperature: float = 1.0     # diverse samples make informative comparisons
    eval_limit: int | None = None       # evaluate on the first N eval prompts; None = all
    eval_max_new_tokens: int = 96       # response length limit at evaluation (greedy)
    eval_bf16: bool = True              # False: fp32 greedy answers that do not depend on their batch (slower)
    batch_size: int = 32                # generation batch size (bundled model, 2-core CPU: 64 samples x 64 tokens
                                        # take 31 s at 16, 26 s at 32, 25 s at 64)
    n_samples: int = 6                  # sample responses shown in the report
    outside_judge: str | None = "labkit"  # IFEval-style outside judge (labkit.ifeval): "labkit" (embedded set),
                                        # "google/IFEval" (online, via datasets), a JSONL path, or None = off
    ptx_source: str = "demonstrations"  # PPO-ptx texts when ppo.ptx_coef > 0: "demonstrations" (the SFT split's),
                                        # "base_answers" (the starting model's answers to the diverse sft prompts)
                                        # or "first_choices" (the room's pooled first choices; needs first_choices)
    ppo_without_ptx: bool = False       # also train and evaluate PPO with ptx_coef = 0 (the alignment-tax ablation)
    first_choices: bool = False         # after each round's rankings, fine-tune the policy on the answers the pooled
                                        # ranking puts first (rankings.first_choices) and start PPO there; that model
                                        # of round 1 is PPO's KL reference (seeds 0-2: 0.59-0.63 win rate vs SFT)
    first_choices_cut: str = "skip"     # a first choice cut off at the sampling length: "skip" it for the next best,
                                        # "trim" it to its last whole sentence, or "keep" it (rankings.CUT_POLICIES)
    first_choices_sft: dict = field(default_factory=dict)  # overrides for labkit.sft.SFTConfig of that fine-tune,
                                        # on top of FIRST_CHOICES_SFT
    train_check_families: list[str] | None = None  # simulated labelers see only these check families
                                        # (labelers.CHECK_FAMILIES); the outside judge shows the unseen ones
    sft: dict = field(default_factory=dict)  # overrides for labkit.sft.SFTConfig
    rm: dict = field(default_factory=dict)   # overrides for labkit.reward.RewardConfig
    ppo: dict = field(default_factory=dict)  # overrides for labkit.ppo.PPOConfig
    keep_checkpoints: bool = False      # keep the stages' resume checkpoints once the run has finished
                                        # (cpu preset: 4.8 of a run folder's 6.1 GB are weights + AdamW state)

    def __post_init__(self):
        # A misspelt override fails here, in the first second, not when its stage starts.
        for name, config_cls in _stage_configs().items():
            fields = {f.name for f in dataclasses.fields(config_cls)}
            unknown = sorted(set(getattr(self, name)) - fields)
            if unknown:
                raise ValueError(f"RunConfig.{name} has unknown key(s) {unknown}; "
                                 f"{config_cls.__name__} knows: {sorted(fields)}")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.rm_ensemble < 1:
            raise ValueError("rm_ensemble must be >= 1")
        if not 2 <= self.k <= 9:
            raise ValueError("k must lie in 2..9 (InstructGPT ranks 4 to 9 responses)")
        if not 0 <= self.overlap <= 1:
            raise ValueError("overlap must lie in [0, 1]")
        if not 1 <= self.labelers_per_prompt <= self.n_labelers:
            raise ValueError(f"labelers_per_prompt must lie in 1..n_labelers ({self.n_labelers})")
        unknown = set(self.train_check_families or []) - set(labelers.CHECK_FAMILIES.values())
        if unknown:
            raise ValueError(f"unknown check families {sorted(unknown)}; "
                             f"choose from {sorted(set(labelers.CHECK_FAMILIES.values()))}")
        if self.ppo_reward not in PPO_REWARDS:
            raise ValueError(f"ppo_reward must be one of {PPO_REWARDS}, got {self.ppo_reward!r}")
        if self.first_choices_cut not in CUT_POLICIES:
            raise ValueError(f"first_choices_cut must be one of {CUT_POLICIES}, got {self.first_choices_cut!r}")
        if self.ptx_source not in PTX_SOURCES:
            raise ValueError(f"ptx_source must be one of {PTX_SOURCES}, got {self.ptx_source!r}")
        if self.ptx_source == "first_choices" and not self.first_choices:
            raise ValueError("ptx_source='first_choices' needs first_choices=True (labkit run --first-choices)")

    @classmethod
    def from_preset(cls, name: str, out_dir: str | None = None, model: str | None = None, **kw) -> "RunConfig":
        """The preset's settings with ``kw`` on top (None values ignored). A stage's settings
        (``sft``, ``rm``, ``ppo``) are merged into the preset's: ``ppo=dict(ptx_coef=0.3)`` keeps
        the preset's other PPO settings."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        values = json.loads(json.dumps(PRESETS[name]))  # a deep copy
        for key, value in kw.items():
            if value is not None:
                values[key] = {**values.get(key, {}), **value} if key in _stage_configs() else value
        if model:
            values["model"] = model
        values["out_dir"] = out_dir or f"runs/{name}"
        return cls(preset=name, **values)


PTX_SOURCES = ("demonstrations", "base_answers", "first_choices")
# The first-choices fine-tune: 2 epochs at lr 1e-4 over the ~190 picks of the cpu preset take
# about 2.5 min on 2 cores (benchmarks/rejection_sampling.py --picks room).
FIRST_CHOICES_SFT = dict(epochs=2.0, learning_rate=1e-4)
PPO_REWARDS = ("rm", "gold")

# Each preset: a model and stage sizes. `cpu` is the bundled model on a 2-core laptop
# (target: the whole run in <= 30 minutes), `tiny` a smoke run in well under a minute.
PRESETS: dict[str, dict] = {
    "tiny": dict(model="tiny", k=4, rm_prompts=16, eval_limit=16, sample_max_new_tokens=16,
                 eval_max_new_tokens=16, n_samples=3, labelers_per_prompt=5,
                 sft=dict(max_steps=6, batch_size=8),
                 rm=dict(max_steps=4, batch_size=4, consensus=True),
                 ppo=dict(steps=3, batch_size=8, mini_batch_size=8, micro_batch_size=8, max_new_tokens=16,
                          gold_every=1, save_every=0)),
    # Answers are sampled for ranking and PPO at the eval's length limit (96 tokens): at 48-64,
    # a fifth to a third of the SFT model's answers were cut off, gold ranks a cut answer low, so
    # the RM learned "shorter is better" (it preferred the shorter answer in 78% of held-out
    # pairs, gold in 64%) and PPO's missing-EOS penalty taught the same: answers fell from 26 to
    # 15 words and PPO lost to SFT on gold (seed 0: win rate 0.53 [0.46, 0.59]).
    # Every labeler of the pool ranks every prompt and the RM trains on their merged ranking
    # (rankings.consensus): on one run's samples the RM agreed with gold on 0.688 of held-out
    # pairs against 0.599 with one labeler per prompt, at the same training cost.
    "cpu": dict(model="smollm2-135m", k=4, rm_prompts=None, eval_limit=None, sample_max_new_tokens=96,
                labelers_per_prompt=5,
                # RM: 4 of a step's 8 prompts per forward pass; with 96-token answers a whole step in
                # one pass peaked at 8.7 GB of RAM
                sft=dict(), rm=dict(micro_batch_size=4, consensus=True),
                # 320 episodes of up to 96 tokens (most stop after 20-40); 4 episodes per forward pass
                # (8 peaked at 12 GB of RAM with the separate value model)
                ppo=dict(steps=20, batch_size=16, mini_batch_size=8, micro_batch_size=4, max_new_tokens=96)),
    "gpu": dict(model="smollm2-135m", k=6, rm_prompts=None, eval_limit=None, batch_size=64,
                sample_max_new_tokens=128, eval_max_new_tokens=128, labelers_per_prompt=5,
                sft=dict(), rm=dict(consensus=True), ppo=dict(steps=100, batch_size=64, mini_batch_size=32, max_new_tokens=128)),
}


# ----------------------------------------------------------------------------- stages

class Run:
    """The run folder and its ``state.json``: which stages finished, with what figures."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.dir = Path(config.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.state = {} if config.fresh or not self.state_path.exists() else json.loads(self.state_path.read_text())
        self.state.setdefault("stages", {})

    def done(self, name: str) -> bool:
        return name in self.state["stages"]

    def stage(self, name: str, fn):
        """Run ``fn`` unless a previous run of this folder finished it; record its result and time."""
        if self.done(name):
            print(f"labkit run: {name} (done earlier, skipped)")
            return self.state["stages"][name]["result"]
        print(f"labkit run: {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.state["stages"][name] = {"result": result, "wall_s": time.perf_counter() - t0}
        json_dump(self.state, self.state_path)
        print(f"labkit run: {name} done in {time.perf_counter() - t0:.1f}s")
        return result


def _stage_configs() -> dict:
    from labkit.ppo import PPOConfig
    from labkit.reward import RewardConfig
    from labkit.sft import SFTConfig

    return {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "first_choices_sft": SFTConfig}


def _save_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _save_answers(path: Path, records: list[dict], responses: list[str], truncated: list[bool]) -> None:
    """One model's answers, a line per prompt: ``{"id", "response", "truncated"}``."""
    _save_jsonl(path, [{"id": r["id"], "response": y, "truncated": t} for r, y, t in zip(records, responses, truncated)])


def _finished(out_dir: Path, fresh: bool) -> dict | None:
    """The result of a stage that already finished in ``out_dir`` (a notebook trained it), if any."""
    path = out_dir / "metrics.json"
    if fresh or not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("model_dir") and not result.get("stopped") else None


def _model_dir(result: dict, out_dir: Path) -> str:
    """A finished stage's model folder: the one inside ``out_dir`` where it has one, so a run folder
    that was copied or moved (an instructor's, handed to the room) or is read from another working
    directory uses its own models, not the paths recorded where it was trained."""
    own = out_dir / "model"
    return str(own) if (own / "config.json").exists() else result["model_dir"]


def _trained(result: dict) -> dict:
    """A stage result, or the stage's own message as an error when it stopped early."""
    if result["stopped"] or not result["model_dir"]:
        raise RuntimeError(f"{Path(result['out_dir']).name} stopped ({result['stopped']}): {result['message']}; "
                           f"see {result['out_dir']}")
    return result


def _weights_key(model_path: str) -> list | None:
    """A model folder and its weight files' names, sizes and times; None without weight files."""
    folder = models.bundled_model_dir() if model_path == models.BUNDLED else Path(model_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    return [str(folder.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _answer_cache_path(cfg: RunConfig, model_path: str, records: list[dict]) -> Path | None:
    """Where the starting model's greedy answers to ``records`` are kept across runs, or None.

    Greedy answers of an unchanged model are the same in every run with the same prompts and
    decoding settings, so runs (and seeds) share them: the key holds the model folder and its
    weight files' sizes and times, the prompts, the length limit, batch size and precision (bf16
    answers can change with the batch), the sampler's forward (labkit's or the model's own: bf16
    rounds them differently), the device, the CPU and the library versions. Models without
    weight files on disk (the tiny test model, a hub id) are not cached."""
    import transformers

    from labkit import generation

    weights = _weights_key(model_path)
    if weights is None:
        return None
    key = json.dumps([*weights, [(r["id"], r["prompt"]) for r in records], cfg.eval_max_new_tokens, cfg.batch_size,
                      cfg.eval_bf16, "lean" if generation.LEAN_FORWARD else "model.forward",
                      str(models.resolve_device(cfg.device)), models.cpu_name(),
                      torch.__version__, transformers.__version__])
    return models.cache_dir() / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"


def _answers(run: Run, model_path: str, records: list[dict], loaded: dict,
             cache: bool = False) -> tuple[list[str], list[bool]]:
    """Greedy answers of ``model_path`` to ``records``; the model is loaded once into ``loaded``.
    With ``cache``, answers come from (and go to) the cross-run cache (:func:`_answer_cache_path`)."""
    cfg = run.config
    path = _answer_cache_path(cfg, model_path, records) if cache else None
    if path is not None and path.exists() and not cfg.fresh:
        rows = load_jsonl(path)
        print(f"labkit run: {len(rows)} answers of {model_path} from the cache ({path})")
        return [r["response"] for r in rows], [r["truncated"] for r in rows]
    if "model" not in loaded:
        loaded["model"], loaded["tok"] = models.load_model(model_path, device=cfg.device)
    ys, ts = evaluate.answer(loaded["model"], loaded["tok"], records,
                             max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, bf16=cfg.eval_bf16)
    if path is not None:
        _save_answers(path, records, ys, ts)
    return ys, ts


def eval_stage(run: Run, name: str, model_path: str, records: list[dict], outside: list[dict] | None = None) -> dict:
    """Greedy answers of one model to the eval prompts (and the outside judge's); saves them;
    returns gold figures and the outside judge's strict accuracies (``outside/...``). The
    starting model's answers come from the cross-run cache when an earlier run made them."""
    loaded: dict = {}
    cache = model_path == run.config.model
    responses, truncated = _answers(run, model_path, records, loaded, cache)
    _save_answers(run.dir / "eval" / f"{name}.jsonl", records, responses, truncated)
    figures = evaluate.gold_figures(records, responses, truncated)
    figures.pop("scores")
    if outside:
        ys, ts = _answers(run, model_path, outside, loaded, cache)
        _save_answers(run.dir / "eval" / f"{name}_outside.jsonl", outside, ys, ts)
        o = evaluate.outside_judge(outside, ys)
        figures.update({"outside/prompt_strict": o["prompt_strict"], "outside/instruction_strict": o["instruction_strict"],
                        "outside/per_family": o["per_family"], "outside/n_prompts": o["n_prompts"]})
    return figures


def ptx_texts_stage(run: Run) -> list[str]:
    """PPO-ptx texts "base_answers": the starting model's greedy answers to the sft split's
    prompts (every category and style), formatted as the policy sees them. They pull the policy
    towards what the model could do before RLHF, on prompts no RM or PPO stage uses (the
    paper mixes in pretraining data, §3.5; a kit has no pretraining set to ship)."""
    from labkit.data import load_prompts

    cfg = run.config
    path = run.dir / "ptx_texts.jsonl"
    if path.exists() and not cfg.fresh:
        return [r["text"] for r in load_jsonl(path)]
    loaded: dict = {}
    records = load_prompts("sft")
    ys, ts = _answers(run, cfg.model, records, loaded, cache=True)
    tok = loaded["tok"] if "tok" in loaded else models.load_model(cfg.model, device=cfg.device)[1]
    # an answer cut at the length limit gets no EOS: the policy should not learn to stop mid-sentence
    texts = [models.format_prompt(tok, r["prompt"]) + y + (tok.eos_token if not t else "")
             for r, y, t in zip(records, ys, ts) if y.strip()]
    _save_jsonl(path, [{"text": t} for t in texts])
    return texts


def samples_settings(cfg: RunConfig, round_: int, policy_path: str, prompts: list[dict]) -> dict:
    """What a round's ranking samples depend on (saved beside them in ``samples_r<round>.json``)."""
    return json.loads(json.dumps({  # as it reads back from the file
        "policy": _weights_key(policy_path), "k": cfg.k, "max_new_tokens": cfg.sample_max_new_tokens,
        "temperature": cfg.sample_temperature, "batch_size": cfg.batch_size, "seed": cfg.seed + 1000 * round_,
        "prompts": [r["id"] for r in prompts]}))


def cut_answers(run_dir: str | Path) -> set[tuple[str, str]]:
    """``(prompt_id, response)`` of every sampled answer of a run folder that was cut off at the
    sampling length limit (all rounds' ``samples_r<round>.json``)."""
    return {(s["prompt_id"], y) for path in sorted(Path(run_dir).glob("samples_r*.json"))
            for s in json.loads(path.read_text())["samples"] for y, t in zip(s["responses"], s["truncated"]) if t}


def reward_model_dirs(run_dir: str | Path, round_: int) -> list[Path]:
    """Round ``round_``'s reward model folders in a run folder (their ``model/`` inside):
    ``rm_r<round>``, then, with ``rm_ensemble``, the other members ``rm_r<round>_m1``, ``_m2``, ..."""
    run_dir = Path(run_dir)
    others = sorted((p for p in run_dir.glob(f"rm_r{round_}_m*") if p.name.rpartition("_m")[2].isdigit()),
                    key=lambda p: int(p.name.rpartition("_m")[2]))
    return [run_dir / f"rm_r{round_}" / "model"] + [p / "model" for p in others]


def round_prompts(cfg: RunConfig, round_: int) -> list[dict]:
    """The rm-split prompts that round ``round_`` ranks.

    ``rm_prompts=None``: the whole split, every round. Otherwise each round draws
    ``rm_prompts`` (every category, the harmful prompts and their look-alikes) from the prompts
    no earlier round ranked, as InstructGPT collected new prompts for each round; a round that
    finds fewer left takes those, and once none are left rounds draw from the whole split again.
    """
    from labkit.data import balanced_sample, load_prompts

    prompts = load_prompts("rm")
    if cfg.rm_prompts is None:
        return prompts
    used: set[str] = set()
    for k in range(1, round_ + 1):
        left = [p for p in prompts if p["id"] not in used] or prompts
        picked = balanced_sample(left, cfg.rm_prompts, seed=cfg.seed + k)
        used |= {p["id"] for p in picked}
    return picked


def rankings_stage(run: Run, round_: int, policy_path: str, store) -> dict:
    """Sample K responses per RM prompt from the current policy; simulated labelers rank them."""
    from labkit.feedback import rankable_responses
    from labkit.generation import sample_k

    cfg = run.config
    prompts = round_prompts(cfg, round_)
    # The samples are kept for re-ranking and calibration (benchmarks/labeler_agreement.py), and
    # a stage that runs again on the same policy weights and settings (a crash after sampling, a
    # new labeling or RM setting) ranks them again instead of sampling anew.
    path = run.dir / f"samples_r{round_}.json"
    settings = samples_settings(cfg, round_, policy_path, prompts)
    saved = json.loads(path.read_text()) if path.exists() and not cfg.fresh else {}
    if settings["policy"] is not None and saved.get("settings") == settings:
        samples = saved["samples"]
        print(f"labkit run: {len(samples)} prompts' samples from {path} (same policy and settings)")
    else:
        model, tok = models.load_model(policy_path, device=cfg.device)
        samples = sample_k(model, tok, prompts, k=cfg.k, max_new_tokens=cfg.sample_max_new_tokens,
                           temperature=cfg.sample_temperature, top_p=1.0, batch_size=cfg.batch_size,
                           seed=cfg.seed + 1000 * round_)
        json_dump({"samples": samples, "settings": settings}, path)
    pool = labelers.labeler_pool(cfg.n_labelers, seed=cfg.seed)
    if cfg.train_check_families:  # a held-out-family experiment: labels reward only these families' checks
        for lab in pool:
            lab.gold = labelers.GoldLabeler(check_families=tuple(cfg.train_check_families))
    tag = f"round{round_}"
    # a resumed stage must not rank twice what a crashed one already stored
    stored = {(x["prompt_id"], x["annotator"]) for x in store.rankings() if x["models"] and x["models"][0] == tag}
    n_rankings, agree, candidates = 0, [], []
    for i, (rec, s) in enumerate(zip(prompts, samples)):
        responses = rankable_responses(s["responses"])
        candidates.append({"record": rec, "responses": responses, "truncated": s["truncated"]})
        # labelers_per_prompt labelers, and one more for a steady `overlap` share of the prompts
        n_who = min(cfg.labelers_per_prompt + ((i * cfg.overlap) % 1 + cfg.overlap >= 1), len(pool))
        who = [pool[(i + j) % len(pool)] for j in range(n_who)]
        tiers_list = []
        for lab in who:
            tiers = lab.rank(rec, responses, truncated=s["truncated"])
            if (rec["id"], f"sim:{lab.name}") not in stored:
                store.add_ranking(rec["id"], responses, tiers, annotator=f"sim:{lab.name}", prompt=rec["prompt"],
                                  models=[tag] * len(responses))
            tiers_list.append(tiers)
            n_rankings += 1
        if len(tiers_list) >= 2:
            agree.append(pair_stats(*tiers_list[:2]))
    # How good are these labels? Every labeler of the pool ranks every prompt of this round
    # (not stored): agreement between labelers (InstructGPT: 72.6 ± 1.5%) and with the gold
    # scorer, on this run's own samples, and the share of pairs gold cannot order.
    m = labelers.measure_agreement(candidates, pool, seed=cfg.seed)
    overlap = pooled_agreement(agree)
    return {"prompts": len(prompts), "rankings": n_rankings, "k": cfg.k,
            "inter_labeler_agreement": None if math.isnan(overlap) else overlap,  # the stored double rankings
            "labeler_agreement": {"inter": m["inter_labeler"], "inter_ci95": m["inter_labeler_ci95"],
                                  "gold": m["gold"], "gold_tied_share": m["gold_tied_share"],
                                  "tie_rate": m["tie_rate"], "n_pairs": m["n_pairs"]}}


def first_choice_demonstrations(run: Run, store) -> list[dict]:
    """Every ranked prompt's first choice by the pooled rankings in ``store`` (simulated and human,
    all rounds so far; :func:`labkit.rankings.first_choices`), without the answers the run's
    sampling cut off as ``first_choices_cut`` says."""
    cfg = run.config
    picks = first_choices(store.to_kway(), cut_answers(run.dir), cfg.first_choices_cut)
    if not picks:
        raise RuntimeError(f"first_choices: every ranked answer was cut off at {cfg.sample_max_new_tokens} tokens; "
                           "raise sample_max_new_tokens or set first_choices_cut='keep'")
    return picks


def train_stages(run: Run, store, upto: str = "ppo") -> dict:
    """SFT, then rankings -> RM -> PPO for each round; a stage the run folder has is skipped
    (recorded in ``state.json``, or a finished stage folder, e.g. one a notebook trained).

    Returns the trained model folders ``{"sft", "rm", "ppo"}`` (the last round's); ``upto``
    ("sft", "rm" or "ppo") stops early. Evaluations are :func:`run`'s business.
    """
    from labkit.ppo import PPOConfig, train_ppo
    from labkit.reward import RewardConfig, train_reward_model
    from labkit.sft import SFTConfig, train_sft

    cfg = run.config

    def stage(name: str, train, config_cls, kind: str | None = None, **fields) -> str:
        """Train stage ``name`` with the run's settings for its kind (cfg.sft, cfg.rm, cfg.ppo; by default
        the name's first word), ``fields`` on top."""
        out = run.dir / name
        settings = {**getattr(cfg, kind or name.split("_")[0]), **fields}
        return _model_dir(run.stage(name, lambda: _finished(out, cfg.fresh) or _trained(train(config_cls(
            **{"out_dir": str(out), "seed": cfg.seed, **settings})))), out)

    folders = {"sft": stage("sft", train_sft, SFTConfig, model=cfg.model)}
    policy = reference = folders["sft"]
    for k in range(1, cfg.rounds + 1):
        if upto == "sft":
            break
        if not _finished(run.dir / f"rm_r{k}", cfg.fresh):  # an RM trained elsewhere needs no new rankings
            run.stage(f"rankings_r{k}", lambda: rankings_stage(run, k, policy, store))
        folders["rm"] = stage(f"rm_r{k}", train_reward_model, RewardConfig, model=folders["sft"], rankings=store,
                              device=cfg.device)
        rms = [folders["rm"]] + [stage(f"rm_r{k}_m{j}", train_reward_model, RewardConfig, model=folders["sft"],
                                       rankings=store, device=cfg.device, seed=cfg.seed + j)
                                 for j in range(1, cfg.rm_ensemble)]
        if upto == "rm":
            break
        if cfg.ppo_reward == "gold":  # the ceiling: the gold scorer pays PPO (on an RM's scale), the RM only judges
            from labkit.data import load_prompts

            reward = dict(reward_fn=labelers.gold_reward(load_prompts("ppo"), scale=labelers.bradley_terry_scale()))
        else:  # several RMs: PPO's reward is their mean
            reward = dict(reward_model=rms if len(rms) > 1 else rms[0])
        # later rounds start from the last policy; the KL penalty keeps pointing at SFT (§3.1), or with
        # first_choices at round 1's fine-tune on them (SFT on more demonstrations)
        start, extra = policy, {}
        ptx = cfg.ppo.get("ptx_coef", 0) > 0
        ptx_picks = ptx and cfg.ptx_source == "first_choices" and not run.done(f"ppo_r{k}")
        if cfg.first_choices:  # the room's first choices taught to the policy; PPO starts there
            name = f"first_choices_r{k}"
            picks = first_choice_demonstrations(run, store) if ptx_picks or not run.done(name) else None
            start = folders[name] = stage(name, train_sft, SFTConfig, kind="first_choices_sft", model=policy,
                                          demonstrations=picks, **{**FIRST_CHOICES_SFT, **cfg.first_choices_sft})
            reference = folders["first_choices_r1"]
            if ptx_picks:  # PPO-ptx on the same picks: PPO keeps what the fine-tune taught
                extra["ptx_texts"] = picks
        if ptx and cfg.ptx_source == "base_answers":
            extra["ptx_texts"] = ptx_texts_stage(run) or None  # None (no answer had text): the demonstrations
            if extra["ptx_texts"] is None:
                print("labkit run: the starting model gave no non-empty answer for PPO-ptx; using the demonstrations")
        policy = folders["ppo"] = stage(f"ppo_r{k}", train_ppo, PPOConfig, model=start, reference=reference,
                                        **reward, **extra)
        if cfg.ppo_without_ptx and k == cfg.rounds:  # the same PPO without the LM term (the alignment tax)
            folders["ppo_noptx"] = stage(f"ppo_r{k}_noptx", train_ppo, PPOConfig, model=start, reference=reference,
                                         ptx_coef=0.0, **reward)
    return folders


def ensure(out_dir: str | Path, upto: str = "rm", store=None, **settings) -> dict:
    """What the earlier notebooks would have left in ``out_dir``, built where it is missing.

    The stages of ``labkit run`` without its evaluations: SFT, simulated labelers ranking K
    samples of the SFT model into ``store`` (default ``out_dir/feedback.sqlite``), the RM,
    PPO. ``settings`` are :class:`RunConfig` fields (``model``, ``seed``, ``rm_prompts``,
    ``sft=dict(max_steps=8)``, ...). Returns ``{"sft", "rm", "ppo"}`` folders and ``"store"``.

    >>> built = ensure("runs/notebooks", upto="rm", model="tiny", rm_prompts=16)
    >>> rm, tok = load_reward_model(built["rm"])
    """
    from labkit.feedback import FeedbackStore

    if upto not in ("sft", "rm", "ppo"):
        raise ValueError(f"upto must be 'sft', 'rm' or 'ppo', got {upto!r}")
    run = Run(RunConfig(out_dir=str(out_dir), **settings))
    store = store if store is not None else FeedbackStore(run.dir / "feedback.sqlite")
    return {**train_stages(run, store, upto), "store": store}


def eval_sets(config: RunConfig) -> tuple[list[dict], list[dict] | None]:
    """The prompts a run's models answer at evaluation: the eval split (its first
    ``eval_limit``) and the outside judge's (None when it is off)."""
    from labkit.data import load_prompts

    records = load_prompts("eval")
    records = records[:config.eval_limit] if config.eval_limit else records
    if not config.outside_judge:
        return records, None
    from labkit.ifeval import load_ifeval_prompts

    outside = load_ifeval_prompts(None if config.outside_judge == "labkit" else config.outside_judge)
    if config.eval_limit:  # an even spread over the set, which is ordered by instruction family
        outside = [outside[i * len(outside) // config.eval_limit] for i in range(min(config.eval_limit, len(outside)))]
    return records, outside


def run(config: RunConfig) -> dict:
    """Run (or resume) the whole pipeline; returns the figures also written to metrics.json."""
    from labkit.feedback import FeedbackStore

    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    r = Run(config)
    json_dump(dataclasses.asdict(config), r.dir / "config.json")
    store = FeedbackStore(r.dir / "feedback.sqlite")
    records, outside = eval_sets(config)

    r.stage("eval_base", lambda: eval_stage(r, "base", config.model, records, outside))
    folders = train_stages(r, store)
    r.stage("eval_sft", lambda: eval_stage(r, "sft", folders["sft"], records, outside))
    picked = [f"first_choices_r{k}" for k in range(1, config.rounds + 1) if config.first_choices]
    for name in picked:
        r.stage(f"eval_{name}", lambda: eval_stage(r, name, folders[name], records, outside))
    for k in range(1, config.rounds + 1):
        r.stage(f"eval_ppo_r{k}", lambda: eval_stage(r, f"ppo_r{k}", str(r.dir / f"ppo_r{k}" / "model"), records,
                                                     outside))
    if config.ppo_without_ptx:
        name = f"ppo_r{config.rounds}_noptx"
        r.stage(f"eval_{name}", lambda: eval_stage(r, name, folders["ppo_noptx"], records, outside))

    final = f"ppo_r{config.rounds}"
    also = {name: folders[name] for name in picked[-1:]}  # the last fine-tune on first choices
    r.stage("compare", lambda: compare_stage(r, records, folders["sft"], folders["ppo"], folders["rm"], final, also))
    if outside:
        r.stage("compare_outside", lambda: compare_outside_stage(r, outside, final, list(also)))
    metrics = collect_metrics(r, t0)
    json_dump(metrics, r.dir / "metrics.json")
    write_run_report(r, metrics, records)
    if not config.keep_checkpoints:
        drop_checkpoints(r.dir)
    return metrics


def drop_checkpoints(run_dir: Path) -> int:
    """Remove the resume checkpoints under a finished run's stage folders (``checkpoint*``: the
    weights and optimizer state a stage resumes from after an interruption); the final models,
    metrics and histories stay. Returns the bytes freed."""
    import shutil

    folders = [p for p in Path(run_dir).glob("*/checkpoint*") if p.is_dir()]
    freed = sum(f.stat().st_size for p in folders for f in p.rglob("*") if f.is_file())
    for p in folders:
        shutil.rmtree(p)
    if folders:
        print(f"labkit run: removed {len(folders)} resume checkpoints ({freed / 1e9:.1f} GB); "
              "keep_checkpoints=True keeps them")
    return freed


def compare_stage(run: Run, records: list[dict], sft_dir: str, policy: str, rm_dir: str, final: str,
                  also: dict[str, str] | None = None) -> dict:
    """Win rates (gold and RM judges) and the final policy's KL to the SFT model; ``also``
    (name -> model folder, e.g. the first-choices fine-tune) gets the same against SFT, and the
    final policy a gold win rate against it; its KL is ``kl_to_sft/<name>``."""
    from transformers import AutoTokenizer

    from labkit.reward import RewardModel

    also = also or {}
    answers = {name: load_jsonl(run.dir / "eval" / f"{name}.jsonl") for name in ("base", "sft", final, *also)}
    resp = {n: [a["response"] for a in rows] for n, rows in answers.items()}
    trunc = {n: [a["truncated"] for a in rows] for n, rows in answers.items()}
    out = {}
    for a, b in ((final, "sft"), (final, "base"), ("sft", "base"), *((n, "sft") for n in also),
                 *((final, n) for n in also)):
        out[f"gold/{a}_vs_{b}"] = evaluate.win_rate(resp[a], resp[b], records, "gold",
                                                    truncated_a=trunc[a], truncated_b=trunc[b])
    rm = RewardModel.from_pretrained(rm_dir, device=run.config.device)
    tok = models.setup_tokenizer(AutoTokenizer.from_pretrained(sft_dir))
    ref_model, _ = models.load_model(sft_dir, device=run.config.device)
    prompts = [r["prompt"] for r in records]
    for name, folder in ((final, policy), *also.items()):
        out[f"rm/{name}_vs_sft"] = evaluate.win_rate(resp[name], resp["sft"], records, rm, tokenizer=tok)
        model, _ = models.load_model(folder, device=run.config.device)
        out["kl_to_sft" if name == final else f"kl_to_sft/{name}"] = evaluate.kl_to_reference(
            model, ref_model, tok, prompts, resp[name], truncated=trunc[name])
        del model
    return out


def compare_outside_stage(run: Run, outside: list[dict], final: str, also: list[str] | None = None) -> dict:
    """Paired differences on the outside judge (SFT - base, PPO - SFT, PPO without ptx - SFT, and
    ``also``'s models - SFT)."""
    names = ["base", "sft", final] + ([f"{final}_noptx"] if run.config.ppo_without_ptx else []) + list(also or [])
    followed = {n: evaluate.outside_judge(outside, [a["response"] for a in load_jsonl(
        run.dir / "eval" / f"{n}_outside.jsonl")])["followed"] for n in names}
    pairs = [("sft", "base"), (final, "sft")] + [(name, "sft") for name in names[3:]]
    return {f"outside/{a}_minus_{b}": evaluate.paired_outside_judge(followed[a], followed[b], seed=run.config.seed)
            for a, b in pairs}


def collect_metrics(run: Run, t0: float) -> dict:
    stages = run.state["stages"]
    evals = {name[5:]: s["result"] for name, s in stages.items() if name.startswith("eval_")}
    return {
        "preset": run.config.preset, "model": run.config.model, "rounds": run.config.rounds,
        "wall_s": sum(s["wall_s"] for s in stages.values()),
        "this_invocation_s": time.perf_counter() - t0,
        "stage_wall_s": {name: s["wall_s"] for name, s in stages.items()},
        "eval": evals,
        "gold_mean": {name: e["gold/mean"] for name, e in evals.items()},
        "comparisons": stages.get("compare", {}).get("result"),
        "outside_judge": {"source": run.config.outside_judge,
                          **{name: {k[8:]: v for k, v in e.items() if k.startswith("outside/")} for name, e in evals.items()
                             if "outside/prompt_strict" in e},
                          "paired": stages.get("compare_outside", {}).get("result")},
        "stages": {name: s["result"] for name, s in stages.items() if not name.startswith("eval_")},
    }
