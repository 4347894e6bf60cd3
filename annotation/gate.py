"""The agreement gate: may annotations with this much agreement become training data?

Every gated question's Fleiss' kappa (from :func:`alignkit.annotation.agreement.compute_agreement`)
must reach ``min_kappa``. ``alignkit annotate export`` exports nothing when the gate fails, and
``alignkit annotate agreement --min-kappa X`` exits with code 3; both record the verdict in the
result as ``result["gate"]``, which the report shows.
"""

from __future__ import annotations

from alignkit.errors import AlignkitError


class GateError(AlignkitError, RuntimeError):
    """The agreement gate failed: nothing was exported (exit 3)."""

    exit_code = 3


def gate(result: dict, min_kappa: float, questions=None) -> tuple[bool, list[str]]:
    """(passed, failures): every gated question's Fleiss' kappa must be >= ``min_kappa``.
    ``questions`` limits the gate to those names (a missing name is a failure); an
    undefined kappa (e.g. every rater always gave the same answer) is a failure too."""
    qres = result["questions"]
    names = list(qres) if questions is None else [str(q) for q in questions]
    failures = []
    for q in names:
        r = qres.get(q)
        if r is None:
            failures.append(f"{q}: question not found in the annotations")
        elif r.get("fleiss_kappa") is None:
            why = r.get("skipped") or "Fleiss' kappa is undefined (not enough variation or items)"
            failures.append(f"{q}: {why}")
        elif r["fleiss_kappa"] < min_kappa:
            failures.append(f"{q}: Fleiss' kappa {r['fleiss_kappa']:.3f} < {min_kappa:g}")
    return (not failures), failures


def apply_gate(result: dict, min_kappa: float, questions=None) -> dict:
    """Run the gate and record its verdict as ``result["gate"]`` (returned): min_kappa, the
    questions checked (all when ``questions`` is empty), passed, failures."""
    passed, failures = gate(result, min_kappa, questions)
    result["gate"] = {"min_kappa": min_kappa, "questions": questions or list(result["questions"]),
                      "passed": passed, "failures": failures}
    return result["gate"]


def raise_if_failed(verdict: dict, consequence: str) -> None:
    """GateError naming the threshold, the questions and each failure, then ``consequence``
    (what happens now, where the report is)."""
    if not verdict["passed"]:
        raise GateError(f"agreement gate failed (min_kappa {verdict['min_kappa']:g} on "
                        f"{', '.join(verdict['questions'])}): " + "; ".join(verdict["failures"])
                        + f". {consequence}")
