"""Benchmark of the Edgeworth / tilted accountant against dp_accounting RDP and PLD.

  python benchmarks/accountant.py [--quick] [--json PATH]

Reports (markdown on stdout, everything in JSON):
  1. speed: seconds per eps evaluation for Edgeworth orders 1-3, tilted,
     certified, dp_accounting RDP and PLD (interval 1e-4) at m = 1e2 .. 1e5,
     with the PLD / tilted ratio;
  2. accuracy of the tilted estimate vs the exact eps over a random sample of
     eps in [0.3, 20], delta in [1e-9, 1e-4], m in [1e2, 1e5], q in [3e-4, 0.1],
     sigma in [0.5, 3], by regime (q*m), including how often it fell back to PLD;
     "exact" = Richardson extrapolation of pessimistic PLD at two fine intervals;
  3. the EW-Tune table: sigma from paper mode, tilted, certified and RDP, with
     the exact eps at each sigma;
  4. calibration time.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dp_accounting import dp_event
from dp_accounting import mechanism_calibration as mc
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from ewtune_tf.accounting import (
    api,
    calibrate_noise_multiplier,
    certify,
    edgeworth,
    pllr,
)


def _event(q, s, m):
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), m)


def rdp_eps(q, s, m, d):
    return rdp_privacy_accountant.RdpAccountant().compose(_event(q, s, m)).get_epsilon(d)


def pld_eps(q, s, m, d, interval=1e-4):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    return acc.compose(_event(q, s, m)).get_epsilon(d)


def exact_eps(q, s, m, d):
    """Pessimistic PLD at two fine intervals, Richardson-extrapolated (slack ~ linear)."""
    sd = math.sqrt(pllr.cumulants(q, s, "Q")[1])
    iv = min(1e-3, max(2e-6, 0.02 * sd))
    comps = ((q, s, m),)
    e1 = certify.epsilon_upper_bound(comps, d, interval=iv).value
    e2 = certify.epsilon_upper_bound(comps, d, interval=iv / 2).value
    return max(2 * e2 - e1, 0.0), e2


def timed(f, reps=1):
    t = time.perf_counter()
    for _ in range(reps):
        out = f()
    return out, (time.perf_counter() - t) / reps


SPEED_SETTINGS = (
    [(0.01, 1.0, m, 1e-5) for m in (100, 1000, 10000, 100000)]
    + [(0.05, 1.0, m, 1e-5) for m in (100, 1000, 10000)]
    + [
        (0.01, 0.8, 1000, 0.015),  # spec case A
        (2000 / 67349, 0.7865, 660, 1e-5),  # spec case B (SST-2)
        (2000 / 392702, 0.573, 3920, 1e-6),
    ]
)  # spec case C (MNLI)


QUICK_SPEED_SETTINGS = SPEED_SETTINGS[:4] + SPEED_SETTINGS[-2:-1]


def speed(quick):
    rows = []
    for q, s, m, d in QUICK_SPEED_SETTINGS if quick else SPEED_SETTINGS:
        comps = ((q, s, m),)
        row = {"m": m, "q": q, "sigma": s, "delta": d}
        for order in (1, 2, 3):
            try:
                e, t = timed(lambda: edgeworth.epsilon_from_delta(comps, d, order, ("remove",)), 3)
            except edgeworth.ExpansionInvalidError:
                e, t = float("nan"), float("nan")
            row[f"edgeworth{order}"] = (e, t)
        # Tilted: one uncached evaluation (clear per-(q, sigma) caches first).
        pllr._cumulants_cached.cache_clear()
        r, t = timed(lambda: api.epsilon_for_components(comps, d, "tilted", 2, False), 1)
        row["tilted"] = (r.epsilon, t)
        row["tilted_estimate_method"] = r.estimate_method
        r, t = timed(lambda: api.epsilon_for_components(comps, d, "tilted", 2, True), 1)
        row["certified"] = (r.epsilon, t)
        row["rdp"] = timed(lambda: rdp_eps(q, s, m, d))
        row["pld_1e-4"] = timed(lambda: pld_eps(q, s, m, d))
        row["pld_over_tilted"] = row["pld_1e-4"][1] / row["tilted"][1]
        rows.append(row)
    return rows


def accuracy(quick, seed=0):
    rng = np.random.default_rng(seed)
    n = 20 if quick else 150
    out = []
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        q = float(10 ** rng.uniform(math.log10(3e-4), -1))
        s = float(rng.uniform(0.5, 3.0))
        m = int(10 ** rng.uniform(2, 5))
        d = float(10 ** rng.uniform(-9, -4))
        # Cheap pre-filter on the RDP bound: skip points certainly outside eps range.
        r = rdp_eps(q, s, m, d)
        if r < 0.3:
            continue
        ex, _ = exact_eps(q, s, m, d)
        if not 0.3 <= ex <= 20:
            continue
        res, t = timed(lambda: api.epsilon_for_components(((q, s, m),), d, "tilted", 2, False))
        out.append(
            {
                "q": q,
                "sigma": s,
                "m": m,
                "delta": d,
                "exact": ex,
                "estimate": res.estimate,
                "estimate_method": res.estimate_method,
                "rel_err": (res.estimate - ex) / ex,
                "seconds": t,
                "qm": q * m,
            }
        )
    return out


def regime(p):
    if p["qm"] <= 10:
        return "few jumps (q*m <= 10)"
    if p["qm"] <= 100:
        return "moderate (10 < q*m <= 100)"
    return "many (q*m > 100)"


def summarize(acc):
    groups = {}
    for p in acc:
        groups.setdefault(regime(p), []).append(p)
    groups["all"] = acc
    summ = {}
    for k, ps in groups.items():
        errs = np.abs([p["rel_err"] for p in ps])
        trusted = np.abs([p["rel_err"] for p in ps if p["estimate_method"] != "pld"])
        summ[k] = {
            "n": len(ps),
            "fell_back_to_pld": sum(p["estimate_method"] == "pld" for p in ps),
            "median_rel_err": float(np.median(errs)) if len(errs) else None,
            "worst_rel_err": float(np.max(errs)) if len(errs) else None,
            "median_rel_err_tilted_only": float(np.median(trusted)) if len(trusted) else None,
            "worst_rel_err_tilted_only": float(np.max(trusted)) if len(trusted) else None,
            "median_ms": float(np.median([p["seconds"] for p in ps]) * 1e3),
        }
    return summ


N = {"MNLI": 392702, "QQP": 363849, "QNLI": 104743, "SST-2": 67349}
ROWS = [
    ("MNLI", 1e-5),
    ("MNLI", 1e-6),
    ("QQP", 1e-5),
    ("QQP", 1e-6),
    ("QNLI", 1e-5),
    ("QNLI", 1e-6),
    ("SST-2", 1e-5),
    ("SST-2", 1e-4),
]


def ewtune_table(quick):
    rows = []
    for task, d in [ROWS[1], ROWS[6], ROWS[7]] if quick else ROWS:
        n = N[task]
        q, m = 2000 / n, 20 * (n // 2000)
        row = {"task": task, "delta": d, "q": q, "m": m}
        row["sigma_paper"] = calibrate_noise_multiplier(8.0, d, q, m, paper=True).noise_multiplier
        row["sigma_tilted"] = calibrate_noise_multiplier(8.0, d, q, m, certify=False).noise_multiplier
        c, t = timed(lambda: calibrate_noise_multiplier(8.0, d, q, m))
        row["sigma_certified"], row["calibration_seconds"] = c.noise_multiplier, t
        row["sigma_rdp"] = mc.calibrate_dp_mechanism(
            rdp_privacy_accountant.RdpAccountant,
            lambda s: _event(q, s, m),
            8.0,
            d,
            mc.LowerEndpointAndGuess(0.3, 1.0),
            tol=1e-5,
        )
        for k in ("paper", "tilted", "certified", "rdp"):
            row[f"exact_eps_at_{k}"] = exact_eps(q, row[f"sigma_{k}"], m, d)[0]
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = {"quick": args.quick}
    result["speed"] = speed(args.quick)
    print("## Speed: eps / ms per evaluation (tilted: estimate only; 'pld' = fell back)\n")
    print("| q | sigma | m | delta | EW1 | EW2 | EW3 | tilted | certified | RDP | PLD 1e-4 | PLD/tilted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["speed"]:
        cell = lambda k: f"{r[k][0]:.4f} / {1e3 * r[k][1]:.2f}"
        print(
            f"| {r['q']:.4g} | {r['sigma']} | {r['m']} | {r['delta']:g} | "
            f"{cell('edgeworth1')} | {cell('edgeworth2')} | {cell('edgeworth3')} | "
            f"{cell('tilted')}{' (pld)' if r['tilted_estimate_method'] == 'pld' else ''} | "
            f"{cell('certified')} | {cell('rdp')} | {cell('pld_1e-4')} | "
            f"{r['pld_over_tilted']:.0f}x |"
        )
    sys.stdout.flush()
    result["ewtune"] = ewtune_table(args.quick)
    print("\n## EW-Tune settings (eps = 8, B = 2000, 20 epochs): sigma (exact eps at it)\n")
    print("| task | delta | paper | tilted | certified | RDP | calib s |")
    print("|---|---|---|---|---|---|---|")
    for r in result["ewtune"]:
        c = lambda k: f"{r['sigma_' + k]:.5f} ({r['exact_eps_at_' + k]:.3f})"
        print(
            f"| {r['task']} | {r['delta']:g} | {c('paper')} | {c('tilted')} | {c('certified')} "
            f"| {c('rdp')} | {r['calibration_seconds']:.2f} |"
        )
    sys.stdout.flush()
    acc = accuracy(args.quick)
    result["accuracy_points"] = acc
    result["accuracy"] = summarize(acc)
    print("\n## Accuracy of the tilted estimate vs exact eps (|rel err|)\n")
    print("| regime | n | fell back to PLD | median | worst | median (tilted only) | worst (tilted only) | median ms |")
    print("|---|---|---|---|---|---|---|---|")
    for k, s in result["accuracy"].items():
        f = lambda x: "-" if x is None else f"{100 * x:.3f}%"
        print(
            f"| {k} | {s['n']} | {s['fell_back_to_pld']} | {f(s['median_rel_err'])} | "
            f"{f(s['worst_rel_err'])} | {f(s['median_rel_err_tilted_only'])} | "
            f"{f(s['worst_rel_err_tilted_only'])} | {s['median_ms']:.1f} |"
        )
    result["total_seconds"] = time.perf_counter() - t0
    print(f"\nTotal {result['total_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
