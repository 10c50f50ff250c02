"""Molecule-design metrics: per-answer checks on hand-picked molecules, and their aggregates computed by hand."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, asdict

import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from caftkit.tasks.molecule_metrics import (
    MOLECULE_METRICS,
    MoleculeCheck,
    check_molecule,
    molecule_metrics,
    uniqueness,
)
from caftkit.tasks.molecules import answer_smiles

ETHANOL = ("CCO", "C2H6O", ["hydroxyl"])  # reference SMILES, requested formula, requested groups


@pytest.mark.parametrize(
    "answer, smiles",
    [
        ("CCO", "CCO"),
        ("  `CCO` is ethanol.", "CCO"),
        ("CCO.\nIt has a hydroxyl group.", "CCO"),
        ("```smiles\nOCC\n```", "OCC"),
        ("```\nOCC\n```", "OCC"),
        ("'C1CC'", "C1CC"),
        ("   \n", ""),
    ],
)
def test_answer_smiles_reads_the_first_word_without_fences_and_punctuation(answer, smiles):
    assert answer_smiles(answer) == smiles


def test_an_invalid_answer_scores_zero_everywhere():
    check = check_molecule("C1CC", *ETHANOL)  # unclosed ring
    assert check == MoleculeCheck(smiles="C1CC", canonical_smiles="", valid=False, formula_match=False,
                                  group_recall=0.0, groups_match=False, exact_match=False, tanimoto=0.0)
    assert check_molecule("", "CCO", "C2H6O", []).group_recall == 0.0  # invalid beats "no groups requested"


def test_the_reference_molecule_with_trailing_text_and_backticks_scores_one_everywhere():
    check = check_molecule("`CCO` -- ethanol", *ETHANOL)
    assert check == MoleculeCheck(smiles="CCO", canonical_smiles="CCO", valid=True, formula_match=True,
                                  group_recall=1.0, groups_match=True, exact_match=True, tanimoto=1.0)


def test_an_equivalent_non_canonical_smiles_is_an_exact_match():
    check = check_molecule("OCC", *ETHANOL)
    assert (check.smiles, check.canonical_smiles, check.exact_match, check.tanimoto) == ("OCC", "CCO", True, 1.0)


def test_an_isomer_matches_the_formula_but_is_not_the_reference():
    # Dimethyl ether has ethanol's formula C2H6O, but an ether oxygen instead of a hydroxyl.
    check = check_molecule("COC", *ETHANOL)
    assert (check.valid, check.formula_match, check.exact_match) == (True, True, False)
    assert (check.group_recall, check.groups_match) == (0.0, False)
    assert 0.0 <= check.tanimoto < 1.0


def test_formula_mismatch():
    check = check_molecule("CCCO", *ETHANOL)  # propanol, C3H8O
    assert (check.valid, check.formula_match, check.groups_match, check.exact_match) == (True, False, True, False)


@pytest.mark.parametrize(
    "answer, groups, recall, all_present",
    [
        ("CCCO", ["hydroxyl", "nitrile"], 0.5, False),  # the hydroxyl, no nitrile
        ("N#CCCO", ["hydroxyl", "nitrile"], 1.0, True),
        ("CCCC", ["hydroxyl", "nitrile"], 0.0, False),
        ("CCCC", [], 1.0, True),  # nothing requested, nothing missing
    ],
)
def test_group_recall(answer, groups, recall, all_present):
    check = check_molecule(answer, "N#CCCO", "C3H5NO", groups)
    assert (check.group_recall, check.groups_match) == (recall, all_present)


def test_tanimoto_of_different_molecules_equals_rdkit_computed_independently():
    # Phenol against aniline: the shared benzene ring gives a similarity strictly between 0 and 1.
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    phenol, aniline = (generator.GetFingerprint(Chem.MolFromSmiles(s)) for s in ("Oc1ccccc1", "Nc1ccccc1"))
    expected = DataStructs.TanimotoSimilarity(phenol, aniline)
    phenol_bits, aniline_bits = set(phenol.GetOnBits()), set(aniline.GetOnBits())
    assert expected == len(phenol_bits & aniline_bits) / len(phenol_bits | aniline_bits)
    assert 0.0 < expected < 1.0
    check = check_molecule("c1ccccc1O", "Nc1ccccc1", "C6H7N", ["benzene ring", "primary amine"])
    assert check.tanimoto == pytest.approx(expected, abs=1e-12)
    assert (check.formula_match, check.group_recall) == (False, 0.5)


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match=r"reference SMILES 'C1CC': RDKit cannot parse it"):
        check_molecule("CCO", "C1CC", "C2H6O", [])
    with pytest.raises(ValueError, match=r"unknown functional group 'alcohol'; expected one of benzene ring, "):
        check_molecule("CCO", "CCO", "C2H6O", ["hydroxyl", "alcohol"])


def test_checks_are_frozen_records_whose_scores_lie_in_zero_one():
    check = check_molecule("COC", *ETHANOL)
    with pytest.raises(FrozenInstanceError):
        check.valid = False
    assert MOLECULE_METRICS == ["valid", "formula_match", "group_recall", "groups_match", "exact_match", "tanimoto"]
    record = asdict(check)
    assert set(MOLECULE_METRICS) < set(record)
    assert all(0.0 <= float(record[name]) <= 1.0 for name in MOLECULE_METRICS)


def _check(smiles, canonical, valid, formula, recall, groups, exact, tanimoto):
    return MoleculeCheck(smiles, canonical, valid, formula, recall, groups, exact, tanimoto)


# Four hand-made checks (each may answer a different request):
#   smiles  canonical valid formula recall groups exact tanimoto
CHECKS = [
    _check("CCO", "CCO", True, True, 1.0, True, True, 1.0),
    _check("OCC", "CCO", True, True, 0.5, False, False, 0.5),
    _check("COC", "COC", True, False, 1.0, True, False, 0.25),
    _check("C1CC", "", False, False, 0.0, False, False, 0.0),
]


def test_aggregates_equal_hand_computed_values():
    metrics = molecule_metrics(CHECKS)
    # validity       3 valid / 4                      = 0.75
    # formula_match  2 / 4                            = 0.5
    # group_recall   (1 + 0.5 + 1 + 0) / 4 = 2.5 / 4  = 0.625
    # groups_match   2 / 4                            = 0.5
    # exact_match    1 / 4                            = 0.25
    # tanimoto       (1 + 0.5 + 0.25 + 0) / 4 = 1.75/4 = 0.4375
    # tanimoto_valid 1.75 / 3 valid                   = 0.58333...
    # uniqueness     {CCO, COC} = 2 distinct / 3 valid (OCC is CCO) = 0.66666...
    assert list(metrics) == ["n", "validity", "formula_match", "group_recall", "groups_match", "exact_match",
                             "tanimoto", "tanimoto_valid", "uniqueness"]
    assert metrics == pytest.approx({"n": 4, "validity": 0.75, "formula_match": 0.5, "group_recall": 0.625,
                                     "groups_match": 0.5, "exact_match": 0.25, "tanimoto": 0.4375,
                                     "tanimoto_valid": 1.75 / 3, "uniqueness": 2 / 3}, abs=1e-12)


def test_uniqueness_is_recomputed_on_a_resample():
    first, second, third, invalid = CHECKS
    assert uniqueness([first, second]) == 0.5  # two spellings of ethanol: one molecule
    assert uniqueness([first, first, third]) == pytest.approx(2 / 3)  # a resample that drew the first check twice
    assert uniqueness([third]) == 1.0
    assert uniqueness([invalid, invalid]) == 0.0  # no valid answer
    assert molecule_metrics([invalid])["tanimoto_valid"] == 0.0


def test_nothing_to_aggregate():
    with pytest.raises(ValueError, match="no molecule checks to aggregate"):
        molecule_metrics([])
