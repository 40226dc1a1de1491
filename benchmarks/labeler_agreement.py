"""How often do simulated labelers agree? Calibrates labkit.labelers.DEFAULT_NOISE.

InstructGPT (Ouyang et al. 2022, §3.4) reports that its training labelers agreed with each
other on 72.6 ± 1.5% of comparisons, the comparisons they actually made: K samples of the
models being trained. This script ranks such a set with pools of simulated labelers at several
noise levels and prints inter-labeler and labeler-vs-gold agreement (pairs tied by either side
left out), with the share of pairs the gold scorer itself ties (labelers order those by noise).

    python benchmarks/labeler_agreement.py              # K = 4 samples of the cpu preset's SFT model per
                                                        # rm prompt (tests/fixtures/labeler_run_samples.json)
    python benchmarks/labeler_agreement.py --run-samples S.json   # other sample_k output ({"samples": [...]})
    python benchmarks/labeler_agreement.py --mixed      # the mixed candidate set instead
    python benchmarks/labeler_agreement.py --mixed --rebuild   # rebuild that set (samples the 135M model)

The mixed set (tests/fixtures/labeler_candidates.json: per prompt the hand-written
demonstration, rewrites of it that break instructions, truncate it, go off topic or refuse, and
samples of the bundled model) spans a much wider range of quality, so the same labelers agree
far more often on it; the default noise is calibrated on the run samples.

Writes benchmarks/results/labeler_agreement.json (``--mixed``: labeler_agreement_mixed.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from labkit import labelers as L

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "labeler_candidates.json"
RUN_FIXTURE = ROOT / "tests" / "fixtures" / "labeler_run_samples.json"
RESULT = ROOT / "benchmarks" / "results" / "labeler_agreement.json"
NOISE_GRID = [0.0, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3]


def build_fixture(n_prompts: int, samples: int, model_name: str, seed: int, max_new_tokens: int,
                  samples_json: str | None = None) -> dict:
    """Draw ``n_prompts`` demonstrations, sample the model on them, and mix K = 4 candidates each."""
    import torch

    from labkit.data import load_demonstrations
    from labkit.generation import sample_k
    from labkit.models import load_model

    demos = sorted(load_demonstrations(), key=lambda d: d["id"])
    sampled, sampling_s = [], None
    t0 = time.time()
    if samples_json:  # samples taken earlier (``sample_k`` output, as a JSON list or {"samples": [...]})
        loaded = json.loads(Path(samples_json).read_text())
        sampled = loaded["samples"] if isinstance(loaded, dict) else loaded
        samples = max(len(s["responses"]) for s in sampled)
        sampling_s = loaded.get("s") if isinstance(loaded, dict) else None
        have = {s["prompt_id"] for s in sampled}
        rest = random.Random(seed).sample([d for d in demos if d["id"] not in have],
                                          max(0, min(n_prompts - len(have), len(demos) - len(have))))
        demos = [d for d in demos if d["id"] in have] + rest
    else:
        demos = random.Random(seed).sample(demos, min(n_prompts, len(demos)))
    if samples and not sampled:
        torch.set_num_threads(2)
        model, tok = load_model(model_name)
        sampled = sample_k(model, tok, demos, k=samples, max_new_tokens=max_new_tokens, seed=seed)
        sampling_s = time.time() - t0
    candidates = L.make_candidates(demos, k=4, seed=seed, samples=sampled)
    return {"about": "K=4 candidate responses per prompt for labeler-agreement calibration; "
                     "built by benchmarks/labeler_agreement.py --rebuild",
            "model": model_name if samples else None, "samples_per_prompt": samples,
            "max_new_tokens": max_new_tokens, "seed": seed, "sampling_s": round(sampling_s or 0.0, 1),
            "candidates": candidates}


def run_candidates(path: str) -> list[dict]:
    """Candidates from ``sample_k`` output: each prompt's K model samples, nothing else."""
    from labkit.data import load_prompts
    from labkit.feedback import rankable_responses

    records = {r["id"]: r for r in load_prompts()}
    loaded = json.loads(Path(path).read_text())
    samples = loaded["samples"] if isinstance(loaded, dict) else loaded
    return [{"record": records[s["prompt_id"]], "responses": rankable_responses(s["responses"]),
             "truncated": s.get("truncated"), "kinds": [f"sample{i}" for i in range(len(s["responses"]))]}
            for s in samples]


def measure(candidates: list[dict], n_labelers: int, seed: int) -> dict:
    rows = []
    for noise in sorted(set(NOISE_GRID) | {L.DEFAULT_NOISE}):
        r = L.measure_agreement(candidates, L.labeler_pool(n_labelers, seed=seed, noise=noise), n_boot=0)
        rows.append({"noise": noise, "inter_labeler": r["inter_labeler"], "with_gold_mean": r["gold"],
                     "tie_rate": r["tie_rate"], "gold_tied_share": r["gold_tied_share"]})
    default = L.measure_agreement(candidates, L.labeler_pool(n_labelers, seed=seed))
    # spread over pools with other noise seeds: how precise is one measurement?
    by_seed = [L.measure_agreement(candidates, L.labeler_pool(n_labelers, seed=seed + s), n_boot=0)["inter_labeler"]
               for s in range(5)]
    kinds: dict[str, list[float]] = {}
    gold = L.GoldLabeler()
    for c in candidates:
        for kind, text, t in zip(c["kinds"], c["responses"], c["truncated"]):
            kinds.setdefault(kind.rstrip("0123456789"), []).append(gold.score(c["record"], text, t))
    return {"grid": rows, "default_noise": L.DEFAULT_NOISE, "default_pool": default,
            "default_by_pool_seed": by_seed,
            "gold_score_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
            "n_prompts": len(candidates), "n_labelers": n_labelers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="with --mixed: rebuild the mixed candidate set first")
    ap.add_argument("--n-prompts", type=int, default=120)
    ap.add_argument("--samples", type=int, default=2, help="model samples per prompt (0: none)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples-json", help="use samples saved from labkit.generation.sample_k instead of sampling")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--labelers", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-samples", default=str(RUN_FIXTURE.relative_to(ROOT)),
                    help="sample_k output (K model samples per prompt) to measure on")
    ap.add_argument("--mixed", action="store_true", help="measure on the mixed candidate set instead")
    args = ap.parse_args()

    if not args.mixed:
        candidates = run_candidates(str(ROOT / args.run_samples))
        result = measure(candidates, args.labelers, args.seed)
        result["source"] = args.run_samples
        report(result, args.labelers, RESULT)
        return
    if args.rebuild or not FIXTURE.exists():
        fixture = build_fixture(args.n_prompts, args.samples, args.model, args.seed, args.max_new_tokens,
                                args.samples_json)
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {FIXTURE.relative_to(ROOT)} ({len(fixture['candidates'])} prompts, "
              f"sampling {fixture['sampling_s']} s)")
    fixture = json.loads(FIXTURE.read_text())
    result = measure(fixture["candidates"], args.labelers, args.seed)
    result["source"] = str(FIXTURE.relative_to(ROOT))
    report(result, args.labelers, RESULT.with_name("labeler_agreement_mixed.json"))


def report(result: dict, n_labelers: int, path: Path) -> None:
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    print(f"\n{result['n_prompts']} prompts ({result['source']}), pool of {n_labelers} labelers "
          "(InstructGPT inter-labeler agreement: 72.6 ± 1.5%)\n")
    print(f"{'noise':>6}  {'inter-labeler':>13}  {'vs gold':>8}  {'ties':>6}  {'gold ties':>9}")
    for r in result["grid"]:
        mark = "  <- default" if abs(r["noise"] - L.DEFAULT_NOISE) < 1e-9 else ""
        print(f"{r['noise']:>6.3f}  {r['inter_labeler']:>13.3f}  {r['with_gold_mean']:>8.3f}  {r['tie_rate']:>6.3f}"
              f"  {r['gold_tied_share']:>9.3f}{mark}")
    d, by_seed = result["default_pool"], result["default_by_pool_seed"]
    mean = sum(by_seed) / len(by_seed)
    std = (sum((x - mean) ** 2 for x in by_seed) / (len(by_seed) - 1)) ** 0.5
    print(f"\ndefault noise {L.DEFAULT_NOISE}: inter-labeler agreement {mean:.3f} ± {std:.3f} "
          f"(mean ± std over {len(by_seed)} pool seeds)")
    print("default pool, agreement with gold: " + ", ".join(f"{k} {v:.3f}" for k, v in d["with_gold"].items()))
    print("mean gold score by candidate kind: " + ", ".join(f"{k} {v:.2f}" for k, v in result["gold_score_by_kind"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
