"""Empirical privacy audit of ewtune_tf's private step: table + JSON.

For each mechanism variant (correct, no_noise, no_clipping, microbatch: the
correct mechanism on keyed microbatch records, sensitivity 2C, claimed at
σ / 2) and each claimed noise multiplier σ, runs

* the many-run audit (neighbouring datasets D, D' = D + canary; Clopper-Pearson
  on a held-out threshold test), and
* the one-run audit (Steinke, Nasr & Jagielski 2023; m canaries, each included
  with probability 1/2),

through the real code path (ewtune_tf.mechanism clipping + EWTuneSGD noise and
update; see ewtune_tf/audit/mechanism_audit.py), and compares the empirical ε
lower bound (at 95% confidence) with the certified ε of the claim.

Usage:
  python benchmarks/audit.py [--quick] [--json PATH] [--markdown PATH]

Plus one many-run row of no_noise with keyed microbatches
("no_noise+microbatch"): a broken mechanism is caught with microbatching too.

--quick (well under 10 minutes on 2 CPU cores): σ = 2, 200k runs per dataset,
2000 canaries. The JSON always has a "mechanisms" entry with, per variant,
the headline (many-run) `empirical_epsilon_lower`, `certified_epsilon`,
`confidence` and `trials`, plus every individual result under "results".
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ewtune_tf import audit

CORRECT = ("correct", "microbatch")  # the mechanisms that must stay below their claim
QUICK = dict(sigmas=(2.0,), trials=200_000, canaries=2000, guesses=400, steps=(1,))
FULL = dict(sigmas=(1.0, 2.0, 4.0), trials=1_000_000, canaries=10_000, guesses=1000, steps=(1, 4))


def run(settings: dict, delta: float, confidence: float, seed: int) -> list:
    results = []
    for sigma in settings["sigmas"]:
        results.append(
            audit.audit_mechanism(
                "no_noise",
                noise_multiplier=sigma,
                delta=delta,
                trials=settings["trials"],
                confidence=confidence,
                num_microbatches=audit.MICROBATCHES,
                seed=seed,
            )
        )
        for mech in audit.MECHANISMS:
            results.append(
                audit.audit_mechanism(
                    mech,
                    noise_multiplier=sigma,
                    delta=delta,
                    trials=settings["trials"],
                    confidence=confidence,
                    seed=seed,
                )
            )
            for steps in settings["steps"]:
                results.append(
                    audit.one_run_audit(
                        mech,
                        noise_multiplier=sigma,
                        delta=delta,
                        num_canaries=settings["canaries"],
                        num_guesses=settings["guesses"],
                        steps=steps,
                        confidence=confidence,
                        seed=seed,
                    )
                )
    return results


def label(r) -> str:
    """Row name: the mechanism, "+microbatch" for a broken one on keyed records."""
    keyed = r.details.get("num_microbatches") is not None and r.mechanism != "microbatch"
    return r.mechanism + ("+microbatch" if keyed else "")


def markdown(results: list) -> str:
    lines = [
        "| audit | mechanism | σ | steps | runs / canaries | empirical ε lower (95%) | certified ε | violation | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.audit} | {label(r)} | {r.noise_multiplier:g} | {r.steps} | {r.trials} | "
            f"{r.empirical_epsilon_lower:.3f} | {r.certified_epsilon:.3f} | "
            f"{'YES' if r.violation else 'no'} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (< 10 min on 2 cores)")
    parser.add_argument("--json", help="write results as JSON to this path")
    parser.add_argument("--markdown", help="write the table to this path")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    start = time.perf_counter()
    results = run(settings, args.delta, args.confidence, args.seed)
    table = markdown(results)
    print(table)

    # Headline per mechanism: the many-run audit at the first (quick: only) σ.
    headline_sigma = settings["sigmas"][0] if args.quick else 2.0
    mechanisms = {}
    for r in results:
        if r.audit == "mechanism" and r.noise_multiplier == headline_sigma:
            mechanisms[label(r)] = {
                "empirical_epsilon_lower": r.empirical_epsilon_lower,
                "certified_epsilon": r.certified_epsilon,
                "confidence": r.confidence,
                "trials": r.trials,
                "noise_multiplier": r.noise_multiplier,
                "delta": r.delta,
                "violation": r.violation,
            }
    correct_ok = all(not r.violation for r in results if r.mechanism in CORRECT)
    broken_caught = all(r.violation for r in results if r.mechanism not in CORRECT and r.audit == "mechanism")
    payload = {
        "benchmark": "audit",
        "quick": bool(args.quick),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "delta": args.delta,
        "confidence": args.confidence,
        "mechanisms": mechanisms,
        "correct_never_exceeds_certified": correct_ok,
        "broken_mechanisms_caught": broken_caught,
        "results": [r.to_dict() for r in results],
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(payload, f, indent=2, default=float)
        os.replace(args.json + ".tmp", args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    print(
        f"total {payload['seconds']:.1f}s; correct never exceeds certified: {correct_ok}; "
        f"broken caught: {broken_caught}"
    )
    return 0 if (correct_ok and broken_caught) else 1


if __name__ == "__main__":
    sys.exit(main())
