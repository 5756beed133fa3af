"""The rules that choose sigma for a PrivacyPlan (``PrivacyPlan.calibrate``).

* ``certified`` (default): ``ewtune_tf.accounting.calibrate_noise_multiplier``
  with certify=True: the smallest sigma (to 1e-4 relative) whose certified
  epsilon is <= the target.
* ``estimate``: the same search on the analytic estimate (certify=False).
* ``edgeworth_paper``: EW-Tune's order-1 Edgeworth point estimate (the paper's
  grid search; not a bound: at the main job it gives sigma 0.52, whose
  certified epsilon is 11.2, not 8).
* ``rdp``: the smallest sigma whose dp_accounting RDP epsilon is <= the target
  (RDP is an upper bound too, looser than ours).

Whatever the rule, the report computes the certified epsilon of the sigma
that ran and labels the rule.
"""

import math
from typing import Any, Dict, Tuple

from ewtune_tf import accounting


def noise_multiplier_for(plan, rule: str) -> Tuple[float, Dict[str, Any]]:
    """(the accountant's sigma, the calibration result as a dict) for ``plan``
    under ``rule``; the noise multiplier is it times the record's sensitivity."""
    if rule == "rdp":
        return _rdp_noise_multiplier(plan)
    result = accounting.calibrate_noise_multiplier(
        plan.target_epsilon,
        plan.delta,
        sampling_probability=plan.sampling_probability,
        steps=plan.steps,
        method=plan.accountant,
        order=plan.accountant_order,
        certify=rule == "certified",
        paper=rule == "edgeworth_paper",
    )
    if rule == "certified" and not result.certified:
        raise ValueError(
            f"target_epsilon={plan.target_epsilon} at delta={plan.delta} could not be certified "
            f"(q={plan.sampling_probability}, steps={plan.steps}); refusing to train on an uncertified sigma."
        )
    return float(result.noise_multiplier), result.to_dict()


def _rdp_noise_multiplier(plan) -> Tuple[float, Dict[str, Any]]:
    from dp_accounting import dp_event
    from dp_accounting import mechanism_calibration as mc
    from dp_accounting.rdp import rdp_privacy_accountant

    def event(log_sigma: float):
        gaussian = dp_event.GaussianDpEvent(math.exp(log_sigma))
        return dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(plan.sampling_probability, gaussian), plan.steps
        )

    # In log(sigma), so the absolute tolerance is a relative one on sigma.
    x = mc.calibrate_dp_mechanism(
        rdp_privacy_accountant.RdpAccountant,
        event,
        plan.target_epsilon,
        plan.delta,
        bracket_interval=mc.LowerEndpointAndGuess(math.log(1e-2), 0.0),
        tol=5e-5,
    )
    sigma = math.exp(x)
    rdp_epsilon = rdp_privacy_accountant.RdpAccountant().compose(event(x)).get_epsilon(plan.delta)
    return sigma, {
        "method": "dp_accounting RdpAccountant + calibrate_dp_mechanism",
        "noise_multiplier": sigma,
        "rdp_epsilon": rdp_epsilon,
        "target_epsilon": plan.target_epsilon,
        "target_delta": plan.delta,
        "sampling_probability": plan.sampling_probability,
        "steps": plan.steps,
    }
