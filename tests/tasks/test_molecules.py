"""The molecule-design task: facts RDKit reads from SMILES, the records built from them, bad input counted."""

from __future__ import annotations

import gzip
import json

import pytest

from caftkit.tasks.molecules import (
    FUNCTIONAL_GROUPS,
    MoleculeFacts,
    describe_molecule,
    design_prompt,
    iter_molecule_records,
    moses_file,
    read_smiles,
    write_molecule_records,
)
from caftkit.tasks.task import RecordStats


@pytest.mark.parametrize(
    "smiles, facts",
    [
        ("CC(=O)O", MoleculeFacts("CC(=O)O", "C2H4O2", ("carboxylic acid",))),
        ("N#Cc1ccccc1", MoleculeFacts("N#Cc1ccccc1", "C7H5N", ("benzene ring", "nitrile"))),
        # Aspirin: the ester oxygen also matches the ether pattern, as the fixed SMARTS define it.
        ("CC(=O)Oc1ccccc1C(=O)O", MoleculeFacts("CC(=O)Oc1ccccc1C(=O)O", "C9H8O4",
                                                ("benzene ring", "carboxylic acid", "ester", "ether"))),
        ("CC(=O)Nc1ccc(O)cc1", MoleculeFacts("CC(=O)Nc1ccc(O)cc1", "C8H9NO2", ("benzene ring", "amide", "hydroxyl"))),
        ("NCCc1ccc(Br)cc1", MoleculeFacts("NCCc1ccc(Br)cc1", "C8H10BrN", ("benzene ring", "primary amine", "bromo"))),
        ("CS(=O)(=O)N", MoleculeFacts("CS(N)(=O)=O", "CH5NO2S", ("sulfonamide",))),
        ("CC(=O)CC", MoleculeFacts("CCC(C)=O", "C4H8O", ("ketone",))),
        ("FC(Cl)Br", MoleculeFacts("FC(Cl)Br", "CHBrClF", ("fluoro", "chloro", "bromo"))),
        ("CCCC", MoleculeFacts("CCCC", "C4H10", ())),
        ("C1CC", None),  # unclosed ring
        ("not a smiles", None),
    ],
)
def test_describe_molecule(smiles, facts):
    assert describe_molecule(smiles) == facts


def test_the_groups_are_the_documented_thirteen():
    assert list(FUNCTIONAL_GROUPS) == ["benzene ring", "amide", "carboxylic acid", "ester", "ketone", "hydroxyl",
                                       "primary amine", "nitrile", "sulfonamide", "fluoro", "chloro", "bromo", "ether"]


def test_records_from_a_smiles_file_skip_and_count_bad_molecules(tmp_path):
    source = tmp_path / "molecules.smi"
    source.write_text("CC(=O)O\nC1CC\n\nCCCC\nOC(=O)C\nN#Cc1ccccc1 benzonitrile\n")
    stats = RecordStats()
    records = list(iter_molecule_records(str(source), n=None, seed=0, stats=stats))
    assert stats.read == 5 and stats.written == 2
    assert stats.skipped == {"invalid SMILES": 1, "none of the functional groups": 1, "duplicate molecule": 1}
    by_smiles = {r["meta"]["smiles"]: r for r in records}
    assert set(by_smiles) == {"CC(=O)O", "N#Cc1ccccc1"}
    record = by_smiles["N#Cc1ccccc1"]
    assert record["messages"] == [
        {"role": "user", "content": "Design a molecule with the molecular formula C7H5N that contains these "
                                    "functional groups: benzene ring, nitrile. Answer with its SMILES string only."},
        {"role": "assistant", "content": "N#Cc1ccccc1"},
    ]
    assert record["meta"] == {"formula": "C7H5N", "groups": ["benzene ring", "nitrile"], "smiles": "N#Cc1ccccc1"}


def test_n_and_seed_choose_a_reproducible_sample_of_moses(tmp_path):
    first = list(iter_molecule_records("moses:test", n=20, seed=3))
    again = list(iter_molecule_records("moses:test", n=20, seed=3))
    other = list(iter_molecule_records("moses:test", n=20, seed=4))
    assert len(first) == 20 and first == again and first != other
    for record in first:
        facts = describe_molecule(record["meta"]["smiles"])
        assert record["messages"][1]["content"] == facts.smiles
        assert record["messages"][0]["content"] == design_prompt(facts.formula, facts.groups)


def test_written_file_and_csv_input(tmp_path):
    source = tmp_path / "molecules.csv.gz"
    with gzip.open(source, "wt") as handle:
        handle.write("id,SMILES\n1,CCO\n2,c1ccccc1C#N\n")
    output = tmp_path / "out" / "molecules.jsonl"
    stats = write_molecule_records(str(source), output, n=5)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert stats.written == 2 and len(lines) == 2
    assert sorted(r["meta"]["smiles"] for r in lines) == ["CCO", "N#Cc1ccccc1"]
    assert read_smiles(str(source)) == [(f"{source}:2", "CCO"), (f"{source}:3", "c1ccccc1C#N")]


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.smi: SMILES file not found"):
        read_smiles(str(tmp_path / "nowhere.smi"))
    empty = tmp_path / "empty.smi"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.smi: the file is empty"):
        read_smiles(str(empty))
    short = tmp_path / "short.csv"
    short.write_text("id,name,SMILES\n1,ethanol\n")
    with pytest.raises(ValueError, match=r"short.csv:2: field 'SMILES': missing"):
        read_smiles(str(short))
    with pytest.raises(ValueError, match="unknown MOSES split 'valid'"):
        moses_file("valid")


def test_command_writes_the_records_and_reports_counts(tmp_path, capsys):
    from caftkit.cli import main

    source = tmp_path / "molecules.smi"
    source.write_text("CC(=O)O\nC1CC\nN#Cc1ccccc1\nCCCC\n")
    output = tmp_path / "task.jsonl"
    assert main(["data", "molecules", "--smiles", str(source), "--output", str(output), "--n", "0"]) == 0
    assert capsys.readouterr().out.strip() == (f"2 records written to {output} from 4 molecules read; skipped: "
                                               "1 invalid SMILES, 1 none of the functional groups")
    assert len(output.read_text().splitlines()) == 2
    # an existing output is the user's: refused and left as it is unless --replace is given
    written = output.read_bytes()
    assert main(["data", "molecules", "--smiles", str(source), "--output", str(output), "--n", "1"]) == 2
    assert capsys.readouterr().err == (f"caft: error: {output}: exists: choose another --output, or "
                                       "--replace it\n")
    assert output.read_bytes() == written
    assert main(["data", "molecules", "--smiles", str(source), "--output", str(output), "--n", "1", "--replace"]) == 0
    assert len(output.read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(["data", "molecules", "--smiles", str(tmp_path / "missing.smi"), "--output", str(output),
                 "--replace"]) == 2
    assert "missing.smi: SMILES file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("N#Cc1ccccc1", (True, True, True)),
        ("  c1ccc(C#N)cc1.\n", (True, True, True)),  # another SMILES of the same molecule, trailing period
        ("Cc1ccccc1C#N", (True, False, True)),  # the groups but one carbon too many
        ("CCCC#N", (True, False, False)),
        ("C1CC", (False, False, False)),
        ("", (False, False, False)),
    ],
)
def test_an_answer_is_checked_for_validity_formula_and_groups(answer, expected):
    from caftkit.tasks.molecule_metrics import check_molecule

    check = check_molecule(answer, "N#Cc1ccccc1", "C7H5N", ["benzene ring", "nitrile"])
    assert (check.valid, check.formula_match, check.groups_match) == expected
