"""Does the room's feedback visibly matter? A room persona through RM and PPO.

A workshop room agrees on a preference (a persona, ``labkit.labelers.PERSONAS``: e.g. "prefer
answers that give an example") and ranks with it. This script stands in for such a room:
``--participants`` simulated persona labelers (``labeler_pool(persona=...)``, each named like
a person, not ``sim:``) rank ``--per-participant`` items each, taken from K samples of the
starting policy through ``labkit.room.seat_queue`` (a few items every seat ranks, the rest
split between seats), into one feedback store. Then:

1. the reward model trained on the room's rankings, and a baseline RM trained on the same
   items ranked by the default pool without the persona (the room's feedback left out);
2. RM accuracy on *persona pairs*: responses to held-out prompts (the ppo split) where exactly
   one of the two shows the trait (does the RM prefer the one with the trait?);
3. with ``--first-choices 1``, the starting policy fine-tuned on the room's pooled first choices
   (``labkit.rankings.first_choices``, as ``labkit run --first-choices``), where PPO then starts;
   a short PPO run against the room's RM;
4. the trait's share in the starting policy's and PPO's answers to eval prompts, greedy
   (what ``labkit run`` evaluates), sampled at PPO's temperature, and greedy counting only
   answers that take up their prompt (``GoldLabeler.on_topic``); beside it the gold score
   and the share of distinct greedy answers, since PPO can buy the trait with one stock reply
   (and the gold score of that reply given to every prompt, for scale).

``--reuse-rm`` trains PPO against the room RM of an earlier run with the same room settings,
so PPO settings can be compared without training the RM again. ``--ppo-reward room`` pays PPO
with the room's taste itself (gold plus the persona bonus, no labeler noise, no RM): the ceiling
a perfect room RM would give, which tells the RM's share of a shortfall from PPO's.

    python benchmarks/room_persona.py                       # the bundled model, ~15-25 min on 2 cores
    python benchmarks/room_persona.py --model tiny --quick  # the plumbing in about a minute

Prints a table and writes benchmarks/results/room_persona.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "room_persona.json"
STOCK_REPLY = "I'm ready to help! What can I help you with today?"  # a non-answer PPO found (it shows the trait)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def persona_pairs(samples: list[dict], detect) -> list[tuple[int, str, str]]:
    """(sample index, response with the trait, response without) for every such pair of one prompt."""
    pairs = []
    for n, s in enumerate(samples):
        has = [detect(y) for y in s["responses"]]
        for i, y in enumerate(s["responses"]):
            for j, z in enumerate(s["responses"]):
                if has[i] and not has[j] and y.strip() and z.strip():
                    pairs.append((n, y, z))
    return pairs


def rm_persona_accuracy(rm_dir: str, samples: list[dict], pairs: list[tuple[int, str, str]]) -> float | None:
    from labkit.reward import load_reward_model

    if not pairs:
        return None
    rm, tok = load_reward_model(rm_dir)
    prompts = [samples[n]["prompt"] for n, _, _ in pairs for _ in range(2)]
    responses = [y for _, a, b in pairs for y in (a, b)]
    scores = rm.score(tok, prompts, responses, progress=False)
    return sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))) / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="starting policy (the SFT model) and RM backbone")
    ap.add_argument("--persona", default="enthusiastic")
    ap.add_argument("--persona-bonus", type=float, default=0.4)
    ap.add_argument("--persona-on-topic", type=int, default=1,
                    help="1: labelers give the bonus only to answers that share a topic word with their prompt")
    ap.add_argument("--participants", type=int, default=25)
    ap.add_argument("--per-participant", type=int, default=20, help="rankings per participant")
    ap.add_argument("--seats", type=int, default=5, help="distinct queues; participants share seats in turn")
    ap.add_argument("--shared", type=int, default=4, help="items every seat ranks (room agreement)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--sample-tokens", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=16, help="held-out RM prompts for the persona pairs")
    ap.add_argument("--rm-steps", type=int, default=24, help="RM optimiser steps; 0 = all of --rm-epochs")
    ap.add_argument("--rm-epochs", type=int, default=1)
    ap.add_argument("--rm-consensus", type=int, default=0,
                    help="1: rankings of the same answers by several participants merge into one (mean rank)")
    ap.add_argument("--rm-lr", type=float, default=5e-5)
    ap.add_argument("--baseline", type=int, default=1, help="1: also train the RM without the persona")
    ap.add_argument("--ppo-steps", type=int, default=10)
    ap.add_argument("--ppo-batch", type=int, default=16)
    ap.add_argument("--ppo-lr", type=float, default=3e-5)
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--ppo-tokens", type=int, default=40)
    ap.add_argument("--missing-eos-penalty", type=float, default=1.0, help="PPO's penalty for an answer cut at --ppo-tokens")
    ap.add_argument("--whiten-scores", type=int, default=0, help="1: standardise the RM scores over each PPO batch")
    ap.add_argument("--group-size", type=int, default=1,
                    help="PPO episodes per prompt, each score compared to its prompt's other answers (1: off)")
    ap.add_argument("--win-reward", type=int, default=0,
                    help="1: pay PPO the chance of beating the starting model's greedy answer (ppo.win_reward)")
    ap.add_argument("--value-warmup-steps", type=int, default=0,
                    help="PPO steps at the start that train only the value model (counted in --ppo-steps)")
    ap.add_argument("--ppo-reward", choices=["rm", "room"], default="rm",
                    help="rm: PPO against the room's RM; room: against the room's taste itself (a noiseless persona "
                         "labeler, labelers.gold_reward), the ceiling a perfect RM would give; no RM is trained")
    ap.add_argument("--reuse-rm", default=None, help="a room RM folder from an earlier run with the same settings "
                    "(skips RM training; the PPO settings may differ)")
    ap.add_argument("--first-choices", type=int, default=0,
                    help="1: fine-tune the starting policy on the room's pooled first choices (2 epochs, lr 1e-4; "
                         "what labkit run --first-choices does) and start PPO from that model")
    ap.add_argument("--first-choices-cut", choices=["skip", "trim", "keep"], default="skip",
                    help="a first choice cut off at --sample-tokens: skip it for the next best, trim it to its last "
                         "whole sentence, or keep it (labkit.rankings.first_choices)")
    ap.add_argument("--eval", type=int, default=48, help="eval prompts")
    ap.add_argument("--eval-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_room_persona")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (plumbing check)")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    if args.quick:
        args.participants, args.per_participant, args.seats, args.rm_steps, args.ppo_steps = 4, 5, 2, 2, 2
        args.ppo_batch, args.eval, args.heldout, args.sample_tokens, args.ppo_tokens = 4, 6, 4, 8, 8
        args.eval_tokens = 8

    import shutil

    import torch

    from labkit import data, evaluate, labelers, models
    from labkit.feedback import FeedbackStore, rankable_responses
    from labkit.generation import sample_k
    from labkit.ppo import PPOConfig, train_ppo
    from labkit.reward import RewardConfig, train_reward_model
    from labkit.room import seat_queue

    torch.set_num_threads(args.threads)
    persona = labelers.get_persona(args.persona)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start, load_start, times = time.perf_counter(), load(), {}

    # 1. Items: K samples of the starting policy per RM-split prompt, as notebook 02 shows them.
    t0 = time.perf_counter()
    n_items = args.shared + args.seats * (args.per_participant - args.shared)
    rm_prompts = data.load_prompts("rm")
    if n_items > len(rm_prompts):
        raise SystemExit(f"{args.seats} seats x {args.per_participant - args.shared} items + {args.shared} shared = "
                         f"{n_items} items, but the rm split has {len(rm_prompts)} prompts: use fewer seats")
    random.Random(args.seed).shuffle(rm_prompts)
    # held-out persona pairs come from the ppo split, which no reward model trains on
    ppo_prompts = data.load_prompts("ppo")
    random.Random(args.seed + 1).shuffle(ppo_prompts)
    ranked, heldout = rm_prompts[:n_items], ppo_prompts[:args.heldout]
    policy, tok = models.load_model(args.model)
    samples = sample_k(policy, tok, ranked + heldout, k=args.k, max_new_tokens=args.sample_tokens, temperature=1.0,
                       top_p=1.0, seed=args.seed, batch_size=32)
    items = [dict(s, record=r, responses=rankable_responses(s["responses"]))
             for s, r in zip(samples[:n_items], ranked)]
    times["sample_s"] = time.perf_counter() - t0

    # 2. The room: participant p sits at seat p % seats and ranks that seat's queue, with the persona.
    store = FeedbackStore(work / "room.sqlite")
    room = labelers.labeler_pool(args.participants, seed=args.seed, persona=persona.name,
                                 persona_bonus=args.persona_bonus, persona_on_topic=bool(args.persona_on_topic))
    plain = labelers.labeler_pool(args.participants, seed=args.seed)
    baseline_rankings = []
    for p, (lab, neutral) in enumerate(zip(room, plain)):
        for it in seat_queue(items, seat=p % args.seats, n_seats=args.seats, shared=args.shared,
                             per_seat=args.per_participant - args.shared):
            store.add_ranking(it["prompt_id"], it["responses"], lab.rank(it["record"], it["responses"], it["truncated"]),
                              annotator=f"p{p + 1:02d}", prompt=it["prompt"], item_id=it["prompt_id"])
            baseline_rankings.append({"prompt": it["prompt"], "prompt_id": it["prompt_id"], "responses": it["responses"],
                                      "tiers": neutral.rank(it["record"], it["responses"], it["truncated"])})
    rankings = store.rankings()
    agreement = store.agreement(gold=None)["inter_annotator"]

    # 3. Reward models: the room's, and (baseline) the same items ranked without the persona.
    def train_rm(name: str, records) -> dict:
        t0 = time.perf_counter()
        result = train_reward_model(RewardConfig(
            model=args.model, rankings=records, out_dir=str(work / name), max_steps=args.rm_steps or None,
            epochs=args.rm_epochs, consensus=bool(args.rm_consensus), batch_size=8,
            learning_rate=args.rm_lr, seed=args.seed, demonstrations=data.load_demonstrations()[:32],
            dashboard=False, progress=False))
        times[f"{name}_s"] = time.perf_counter() - t0
        return result

    held = samples[n_items:]
    pairs = persona_pairs(held, persona.detect)
    rm_room, rm_base, acc_room, acc_base = {}, None, None, None
    if args.ppo_reward == "room":  # the ceiling: PPO paid by the room's taste itself, no RM
        taste = labelers.SimulatedLabeler(persona=persona.name, persona_bonus=args.persona_bonus, noise=0.0,
                                          persona_on_topic=bool(args.persona_on_topic))  # gold + bonus, no noise
        reward = dict(reward_fn=labelers.gold_reward(data.load_prompts("ppo"), taste.utility))
    else:
        rm_room = ({**json.loads((Path(args.reuse_rm).parent / "metrics.json").read_text()), "model_dir": args.reuse_rm}
                   if args.reuse_rm else train_rm("rm_room", rankings))
        rm_base = train_rm("rm_without_room", baseline_rankings) if args.baseline else None
        acc_room = rm_persona_accuracy(rm_room["model_dir"], held, pairs)
        acc_base = rm_persona_accuracy(rm_base["model_dir"], held, pairs) if rm_base else None
        reward = dict(reward_model=rm_room["model_dir"])

    # 3b. The room's first choices as demonstrations: the starting policy fine-tuned on them.
    start, picks = args.model, []
    if args.first_choices:
        from labkit.pipeline import FIRST_CHOICES_SFT
        from labkit.rankings import first_choices
        from labkit.sft import SFTConfig, train_sft

        t0 = time.perf_counter()
        # answers cut at --sample-tokens, as --first-choices-cut says (--quick keeps them: the tiny model never stops)
        cut = {(it["prompt_id"], y) for it in items for y, t in zip(it["responses"], it["truncated"]) if t}
        kway = store.to_kway()
        picks = first_choices(kway, cut, "keep" if args.quick else args.first_choices_cut)
        if not picks:
            raise SystemExit(f"every ranked answer was cut off at {args.sample_tokens} tokens: raise --sample-tokens")
        tuned = train_sft(SFTConfig(model=args.model, demonstrations=picks, out_dir=str(work / "first_choices"),
                                    seed=args.seed, dashboard=False, progress=False, **FIRST_CHOICES_SFT))
        if tuned["stopped"]:
            raise SystemExit(f"the first-choices fine-tune stopped: {tuned['message']}")
        start = tuned["model_dir"]
        times["first_choices_s"] = time.perf_counter() - t0

    # 4. PPO against the room's RM, or its taste itself (KL to the policy it starts from).
    t0 = time.perf_counter()
    ppo = train_ppo(PPOConfig(
        model=start, **reward, out_dir=str(work / "ppo"), steps=args.ppo_steps,
        batch_size=args.ppo_batch, mini_batch_size=min(8, args.ppo_batch), micro_batch_size=min(8, args.ppo_batch),
        learning_rate=args.ppo_lr, kl_coef=args.kl_coef, max_new_tokens=args.ppo_tokens, seed=args.seed,
        missing_eos_penalty=args.missing_eos_penalty, whiten_scores=bool(args.whiten_scores),
        group_size=args.group_size, win_reward=bool(args.win_reward),
        value_warmup_steps=args.value_warmup_steps, gold_every=0, sample_every=0, save_every=0, dashboard=False, progress=False))
    times["ppo_s"] = time.perf_counter() - t0
    if ppo["stopped"]:
        raise SystemExit(f"PPO stopped: {ppo['message']}")

    # 5. The trait in answers to eval prompts: starting policy vs PPO, greedy and sampled.
    t0 = time.perf_counter()
    records = data.load_prompts("eval")[:args.eval]
    shares, gold, distinct, examples = {}, {}, {}, {}
    gold_labeler = labelers.GoldLabeler()
    for name, path in (("sft", args.model), *((("first_choices", start),) if picks else ()), ("ppo", ppo["model_dir"])):
        lm, lm_tok = models.load_model(path)
        greedy, cut = evaluate.answer(lm, lm_tok, records, max_new_tokens=args.eval_tokens, batch_size=24)
        sampled, _ = evaluate.answer(lm, lm_tok, records, max_new_tokens=args.eval_tokens, temperature=0.7,
                                     batch_size=24, seed=args.seed)
        shares[name] = {"greedy": labelers.trait_share(persona, greedy),
                        "sampled": labelers.trait_share(persona, sampled),
                        # the trait in answers that take up their prompt (a stock reply does not)
                        "greedy_on_topic": sum(persona.detect(y) and gold_labeler.on_topic(r, y)
                                               for r, y in zip(records, greedy)) / len(greedy)}
        # a trait bought with one stock reply is reward hacking, not the room's influence: gold and the
        # share of distinct answers tell them apart (gold alone does not: see the stock reply below)
        gold[name] = evaluate.gold_figures(records, greedy, cut)["gold/mean"]
        distinct[name] = len(set(greedy)) / len(greedy)
        examples[name] = [{"prompt": r["prompt"], "greedy": y} for r, y in zip(records[:4], greedy[:4])]
    # what one stock reply to every prompt scores with the gold labeler
    gold["stock_reply"] = evaluate.gold_figures(records, [STOCK_REPLY] * len(records))["gold/mean"]
    times["eval_s"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    item_share = labelers.trait_share(persona, [y for it in items for y in it["responses"]])

    result = {
        "benchmark": "room_persona",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": load(),
                    "note": "the load averages tell whether other jobs shared the machine"},
        "command": "python benchmarks/room_persona.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "work", "quick")),
        "settings": vars(args),
        "persona": {"name": persona.name, "preference": persona.preference},
        "room": {"participants": args.participants, "rankings": len(rankings), "items": n_items, "k": args.k,
                 "inter_annotator_agreement": agreement, "trait_share_in_ranked_items": item_share},
        "rm": {"room": {k: rm_room.get(k) for k in ("eval/accuracy", "train/steps", "data/n_train")},
               "without_room": None if rm_base is None else {
                   k: rm_base.get(k) for k in ("eval/accuracy", "train/steps", "data/n_train")},
               "persona_pairs": len(pairs), "persona_pair_accuracy_room": acc_room,
               "persona_pair_accuracy_without_room": acc_base,
               "rankings_merged": rm_room.get("data/n_merged"), "train_steps": rm_room.get("train/steps")},
        "ppo": {k: ppo.get(k) for k in ("objective/scores", "objective/kl", "train/steps", "time/total_s")},
        "trait_share": shares,
        "trait_share_rise_points": {m: 100 * (shares["ppo"][m] - shares["sft"][m])
                                    for m in ("greedy", "sampled", "greedy_on_topic")},
        "first_choices": None if not picks else {
            "picks": len(picks), "trimmed": sum(p["trimmed"] for p in picks),
            "trait_share_in_picks": labelers.trait_share(persona, [p["response"] for p in picks]),
            "trait_share_in_picks_keeping_cut": labelers.trait_share(
                persona, [p["response"] for p in first_choices(kway, cut, "keep")]),
            "trait_share_rise_points": {m: 100 * (shares["first_choices"][m] - shares["sft"][m])
                                        for m in ("greedy", "sampled", "greedy_on_topic")}},
        "gold_greedy": gold,
        "distinct_greedy_answers": distinct,
        "examples": examples,
        "time_s": {**times, "wall": wall},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False, default=float) + "\n")

    print(f"persona {persona.name!r}: {persona.preference}")
    print(f"room: {args.participants} participants x {args.per_participant} = {len(rankings)} rankings of {n_items} "
          f"items (K={args.k}), agreement {agreement:.1%}; trait in the ranked samples {item_share:.1%}")
    if picks:
        fc = result["first_choices"]
        print(f"first choices: {len(picks)} answers ({fc['trimmed']} trimmed), the trait in "
              f"{fc['trait_share_in_picks']:.1%} of them ({fc['trait_share_in_picks_keeping_cut']:.1%} "
              "with the cut-off ones as they are)")
    names = [n for n in ("sft", "first_choices", "ppo") if n in shares]
    print(f"{'':24} " + " ".join(f"{n:>14}" for n in names) + f" {'PPO - start':>12}")
    for m in ("greedy", "sampled", "greedy_on_topic"):
        s, p = shares["sft"][m], shares["ppo"][m]
        print(f"trait, {m:<17} " + " ".join(f"{shares[n][m]:14.1%}" for n in names) + f" {100 * (p - s):+10.1f}pt")
    print("gold, greedy             " + " ".join(f"{gold[n]:14.3f}" for n in names)
          + f" {gold['ppo'] - gold['sft']:+12.3f}   (PPO's KL to its start: {ppo.get('objective/kl', float('nan')):.1f} nats)")
    print("distinct answers, greedy " + " ".join(f"{distinct[n]:14.1%}" for n in names)
          + f"   (gold of one stock reply to every prompt: {gold['stock_reply']:.3f})")
    fmt = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    print(f"RM prefers the trait on {len(pairs)} held-out persona pairs: room RM {fmt(acc_room)}, "
          f"without the room {fmt(acc_base)}")
    print("wall " + ", ".join(f"{k} {v:.0f}s" for k, v in result["time_s"].items()) + f"; load {load_start} -> {load()}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
