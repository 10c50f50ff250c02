"""Metrics of the molecule-design task: how each generated SMILES meets its request, and their means over a test set.

`check_molecule` scores one answer against the request (formula and functional groups) and the reference molecule
the request was made from; `molecule_metrics` aggregates the checks of a test set. The per-example scores named in
`MOLECULE_METRICS` are each 0/1 or in [0, 1], so a bootstrap over test examples can resample them directly;
`uniqueness` is a property of a set of answers and is recomputed from the checks of each resample.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .molecules import FUNCTIONAL_GROUPS, answer_smiles, describe_molecule, rdkit_modules

# Morgan fingerprints of radius 2 folded to 2048 bits (ECFP4-like), the usual setting for molecule similarity.
FINGERPRINT_RADIUS = 2
FINGERPRINT_BITS = 2048

# Per-example field -> name of its mean in `molecule_metrics`, in the order a report shows them.
AGGREGATE_NAMES: dict[str, str] = {
    "valid": "validity",
    "formula_match": "formula_match",
    "group_recall": "group_recall",
    "groups_match": "groups_match",
    "exact_match": "exact_match",
    "tanimoto": "tanimoto",
}

# The per-example fields of `MoleculeCheck` that are 0/1 or [0, 1] scores, in report order.
MOLECULE_METRICS: list[str] = list(AGGREGATE_NAMES)


@dataclass(frozen=True)
class MoleculeCheck:
    """How one generated answer meets its molecule-design request.

    Attributes:
        smiles: the SMILES read from the answer (`answer_smiles`); empty when the answer is blank.
        canonical_smiles: RDKit's canonical form of `smiles`; empty when it is not valid.
        valid: RDKit parses `smiles` into a molecule.
        formula_match: valid, and the molecule's formula (RDKit `CalcMolFormula`, Hill order) equals the requested
            formula exactly.
        group_recall: fraction of the requested functional groups whose SMARTS pattern matches the molecule;
            0.0 when not valid, 1.0 when valid and the request names no groups.
        groups_match: valid, and every requested functional group is present.
        exact_match: valid, and the canonical SMILES equals the canonical SMILES of the reference molecule (the
            same molecule, however it was written).
        tanimoto: Tanimoto similarity of the Morgan fingerprints (radius 2, 2048 bits) of the answer and the
            reference; 0.0 when not valid.
    """

    smiles: str
    canonical_smiles: str
    valid: bool
    formula_match: bool
    group_recall: float
    groups_match: bool
    exact_match: bool
    tanimoto: float


@lru_cache(maxsize=1)
def _morgan_generator():
    rdkit_modules()  # names the fix when RDKit is missing
    from rdkit.Chem import rdFingerprintGenerator  # deferred: caft starts without RDKit

    return rdFingerprintGenerator.GetMorganGenerator(radius=FINGERPRINT_RADIUS, fpSize=FINGERPRINT_BITS)


def tanimoto_similarity(first_smiles: str, second_smiles: str) -> float:
    """Tanimoto similarity (shared on-bits / on-bits of either) of the Morgan fingerprints, radius 2 and 2048 bits,
    of two valid SMILES."""
    Chem, _ = rdkit_modules()
    from rdkit import DataStructs  # deferred: caft starts without RDKit

    generator = _morgan_generator()
    first, second = (generator.GetFingerprint(Chem.MolFromSmiles(smiles)) for smiles in (first_smiles, second_smiles))
    return float(DataStructs.TanimotoSimilarity(first, second))


def check_molecule(answer: str, reference_smiles: str, formula: str, groups: Iterable[str]) -> MoleculeCheck:
    """Check a generated `answer` against a request for a molecule with `formula` containing `groups` (names of
    `FUNCTIONAL_GROUPS`) that was made from the molecule `reference_smiles`. See `MoleculeCheck` for each field.

    Raises ValueError when the reference SMILES does not parse or a group name is not one of the task's groups:
    both are faults of the test data, not of the answer.
    """
    reference = describe_molecule(reference_smiles)
    if reference is None:
        raise ValueError(f"reference SMILES {reference_smiles!r}: RDKit cannot parse it")
    requested = list(groups)
    unknown = [name for name in requested if name not in FUNCTIONAL_GROUPS]
    if unknown:
        raise ValueError(f"unknown functional group {unknown[0]!r}; expected one of {', '.join(FUNCTIONAL_GROUPS)}")
    smiles = answer_smiles(answer)
    facts = describe_molecule(smiles)
    if facts is None:
        return MoleculeCheck(smiles, "", False, False, 0.0, False, False, 0.0)
    present = sum(name in facts.groups for name in requested)
    return MoleculeCheck(
        smiles=smiles,
        canonical_smiles=facts.smiles,
        valid=True,
        formula_match=facts.formula == formula,
        group_recall=present / len(requested) if requested else 1.0,
        groups_match=present == len(requested),
        exact_match=facts.smiles == reference.smiles,
        tanimoto=tanimoto_similarity(facts.smiles, reference.smiles),
    )


def uniqueness(checks: Sequence[MoleculeCheck]) -> float:
    """Distinct canonical SMILES among the valid answers divided by the number of valid answers (two spellings of
    one molecule count once); 0.0 when no answer is valid. A property of the whole set of answers: a bootstrap
    recomputes it on each resample of the checks."""
    valid = [check.canonical_smiles for check in checks if check.valid]
    return len(set(valid)) / len(valid) if valid else 0.0


def molecule_metrics(checks: Sequence[MoleculeCheck]) -> dict[str, float]:
    """Aggregate the per-example checks of a test set.

    Returns, in report order:
        n: number of examples.
        validity: fraction of answers RDKit parses.
        formula_match: fraction of answers with exactly the requested formula (invalid answers count as misses).
        group_recall: mean over examples of the fraction of requested functional groups present (0 for invalid).
        groups_match: fraction of answers containing every requested functional group.
        exact_match: fraction of answers that are the reference molecule (canonical SMILES equal).
        tanimoto: mean Morgan-fingerprint Tanimoto similarity to the reference over all examples, invalid answers
            counted as 0.
        tanimoto_valid: the same mean over valid answers only; 0.0 when none is valid.
        uniqueness: distinct canonical SMILES / valid answers (`uniqueness`); 0.0 when none is valid.

    Raises ValueError on an empty list: there is nothing to average.
    """
    if not checks:
        raise ValueError("no molecule checks to aggregate")
    n = len(checks)
    metrics: dict[str, float] = {"n": n}
    for field_name, metric_name in AGGREGATE_NAMES.items():
        metrics[metric_name] = sum(float(getattr(check, field_name)) for check in checks) / n
    valid_similarities = [check.tanimoto for check in checks if check.valid]
    metrics["tanimoto_valid"] = sum(valid_similarities) / len(valid_similarities) if valid_similarities else 0.0
    metrics["uniqueness"] = uniqueness(checks)
    return metrics
