"""`ewtune-accountant`: epsilon, delta and noise calibration from the shell.

  ewtune-accountant epsilon --sampling-probability Q --noise-multiplier S \
      --steps M --delta D [--method edgeworth|tilted] [--order 1|2|3] \
      [--no-certify] [--json]
  ewtune-accountant delta ... --epsilon E ...
  ewtune-accountant calibrate --target-epsilon E --delta D \
      (--sampling-probability Q --steps M | --num-examples N --batch-size B \
       --epochs K) [--method ...] [--order ...] [--paper] [--no-certify] [--json]

--json prints exactly one JSON object. Without it, a small table compares
Edgeworth orders 1-3, tilted, RDP and PLD with timings. Bad input exits with
status 2 and an argparse-style message naming the flag.
Also runnable as `python -m ewtune_tf.accounting.cli`.
"""

import argparse
import json
import sys
import time
from typing import List, Optional

from ewtune_tf.accounting import _validation as v
from ewtune_tf.accounting import api, calibration, edgeworth
from ewtune_tf.accounting import certify as certify_lib


def _checked(check, flag):
    """argparse `type=` that applies a validator and names the flag on error."""

    def convert(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: not a number: {text!r}") from None
        try:
            return check(value)
        except ValueError as err:
            msg = str(err).split(" must ", 1)
            raise argparse.ArgumentTypeError(f"{flag} must {msg[1]}" if len(msg) == 2 else f"{flag}: {err}") from None

    return convert


_Q = _checked(v.check_sampling_probability, "--sampling-probability")
_SIGMA = _checked(v.check_noise_multiplier, "--noise-multiplier")
_STEPS = _checked(v.check_steps, "--steps")
_DELTA = _checked(v.check_delta, "--delta")
_EPS = _checked(v.check_epsilon, "--epsilon")
_TARGET_EPS = _checked(v.check_target_epsilon, "--target-epsilon")
_N = _checked(lambda x: v.check_positive_int(x, "num_examples"), "--num-examples")
_B = _checked(lambda x: v.check_positive_int(x, "batch_size"), "--batch-size")
_EPOCHS = _checked(lambda x: v.check_positive_real(x, "epochs"), "--epochs")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method", choices=list(v.METHODS), default="tilted", help="analytic method (default: tilted saddlepoint)"
    )
    p.add_argument("--order", type=int, choices=list(v.ORDERS), default=2, help="expansion order (default 2)")
    p.add_argument(
        "--no-certify",
        dest="certify",
        action="store_false",
        help="report the analytic estimate without the PLD bound (NOT a guarantee)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ewtune-accountant",
        description="Edgeworth / saddlepoint privacy accountant for DP-SGD "
        "(Poisson-subsampled Gaussian, add-or-remove adjacency).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("epsilon", "delta"):
        p = sub.add_parser(name, help=f"compute {name}")
        p.add_argument("--sampling-probability", type=_Q, required=True)
        p.add_argument("--noise-multiplier", type=_SIGMA, required=True)
        p.add_argument("--steps", type=_STEPS, required=True)
        if name == "epsilon":
            p.add_argument("--delta", type=_DELTA, required=True)
        else:
            p.add_argument("--epsilon", type=_EPS, required=True)
        _common(p)
    p = sub.add_parser("calibrate", help="smallest noise multiplier for a target")
    p.add_argument("--target-epsilon", type=_TARGET_EPS, required=True)
    p.add_argument("--delta", type=_DELTA, required=True)
    p.add_argument("--sampling-probability", type=_Q)
    p.add_argument("--steps", type=_STEPS)
    p.add_argument("--num-examples", type=_N)
    p.add_argument("--batch-size", type=_B)
    p.add_argument("--epochs", type=_EPOCHS)
    p.add_argument("--paper", action="store_true", help="EW-Tune's order-1 grid search (approximation)")
    _common(p)
    return parser


def _rdp_epsilon(q, sigma, steps, delta):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def _comparison_rows(q, sigma, steps, delta):
    comps = ((q, sigma, steps),)
    rows = []
    for order in (1, 2, 3):
        t = time.perf_counter()
        try:
            val = "%.6f" % edgeworth.epsilon_from_delta(comps, delta, order, directions=("remove",))
        except edgeworth.ExpansionInvalidError:
            val = "invalid"
        rows.append((f"edgeworth order {order} (remove, estimate)", val, time.perf_counter() - t))
    r = api.epsilon_for_components(comps, delta, "tilted", 2, certify=False)
    rows.append(
        (
            f"tilted (estimate{'' if r.estimate_method != 'pld' else ': fell back to PLD'})",
            "%.6f" % r.estimate,
            r.seconds,
        )
    )
    t = time.perf_counter()
    rows.append(
        ("RDP (dp_accounting, upper bound)", "%.6f" % _rdp_epsilon(q, sigma, steps, delta), time.perf_counter() - t)
    )
    b = certify_lib.epsilon_upper_bound(comps, delta, reference=r.estimate)
    rows.append((f"PLD pessimistic (interval {b.value_discretization_interval:.1e})", "%.6f" % b.value, b.seconds))
    return rows


def _table(rows) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"{'method':<{w}}  {'epsilon':>12}  {'ms':>9}", "-" * (w + 26)]
    for name, val, sec in rows:
        lines.append(f"{name:<{w}}  {val:>12}  {1e3 * sec:9.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"epsilon": _epsilon_command, "delta": _delta_command, "calibrate": _calibrate_command}
    return command[args.command](parser, args)


def _label(certified: bool) -> str:
    return "certified upper bound" if certified else "ESTIMATE (not a guarantee)"


_ACCOUNTANT_OPTIONS = ("method", "order", "certify")


def _pick(args: argparse.Namespace, *names: str) -> dict:
    """``{name: args.name}``: flags passed on to the API under their own names."""
    return {name: getattr(args, name) for name in names}


def _mechanism(args: argparse.Namespace) -> dict:
    """The composition and accountant options shared by `epsilon` and `delta`."""
    return _pick(args, "sampling_probability", "noise_multiplier", "steps", *_ACCOUNTANT_OPTIONS)


def _epsilon_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    res = api.compute_epsilon(delta=args.delta, **_mechanism(args))
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    print(_table(_comparison_rows(args.sampling_probability, args.noise_multiplier, args.steps, args.delta)))
    print()
    print(
        f"epsilon = {res.epsilon:.6f}  [{_label(res.certified)}; method {res.method}; "
        f"{1e3 * res.seconds:.1f} ms]" + (f"  flags: {', '.join(res.flags)}" if res.flags else "")
    )
    return 0


def _delta_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    res = api.compute_delta(epsilon=args.epsilon, **_mechanism(args))
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    print(
        f"delta = {res.delta:.6e}  [{_label(res.certified)}; method {res.method}; estimate "
        f"{res.estimate:.6e} ({res.estimate_method}); "
        f"{1e3 * res.seconds:.1f} ms]"
    )
    return 0


def _check_calibrate_form(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one of the two argument forms, complete (parser.error otherwise)."""
    by_q = args.sampling_probability is not None or args.steps is not None
    by_n = any(x is not None for x in (args.num_examples, args.batch_size, args.epochs))
    if by_q == by_n:
        parser.error(
            "calibrate needs either --sampling-probability and --steps, or --num-examples, --batch-size and --epochs"
        )
    if by_q and (args.sampling_probability is None or args.steps is None):
        parser.error("--sampling-probability and --steps must be given together")
    if by_n and None in (args.num_examples, args.batch_size, args.epochs):
        parser.error("--num-examples, --batch-size and --epochs must be given together")
    if by_n and args.batch_size > args.num_examples:
        parser.error("--batch-size must be <= --num-examples")


def _calibrate_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    _check_calibrate_form(parser, args)
    res = calibration.calibrate_noise_multiplier(
        args.target_epsilon,
        args.delta,
        **_pick(args, "sampling_probability", "steps", "num_examples", "batch_size", "epochs", "paper"),
        **_pick(args, *_ACCOUNTANT_OPTIONS),
    )
    if args.json:
        d = res.to_dict()
        # Flat number under "epsilon" (like the other subcommands); the full
        # accounting record under "epsilon_result".
        d["epsilon_result"] = d.pop("epsilon")
        d["epsilon"] = res.epsilon.epsilon
        print(json.dumps(d))
        return 0
    label = "certified" if res.certified else "ESTIMATE (not a guarantee)"
    print(
        f"noise_multiplier = {res.noise_multiplier:.6f}  (q = "
        f"{res.sampling_probability:.6g}, steps = {res.steps}, delta = "
        f"{res.target_delta:g})"
    )
    print(
        f"epsilon at it    = {res.epsilon.epsilon:.6f}  [{label}; "
        f"{res.epsilon.method}]  calibration took {res.seconds:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
