"""The molecule-design task behind the `Task` interface: its records (`caft data molecules`), its test examples
(MOSES molecules or a records file), and the RDKit checks of an answer (`molecule_metrics`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from ..data import DataError, iter_raw_records
from .molecule_metrics import check_molecule, molecule_metrics
from .molecules import describe_molecule, iter_molecule_records, write_molecule_records
from .settings import MoleculeDataSettings
from .task import ReportMetric, Task, TaskExample, reference_records


def molecules_data_command(settings: MoleculeDataSettings) -> dict:
    """Build molecule-design records (`messages` JSONL) from SMILES with RDKit.

    The user asks for a molecule with a given molecular formula that contains given functional groups; the
    assistant answers with the canonical SMILES. A `meta` field keeps the formula, the groups and the SMILES.
    The groups (name: SMARTS) are fixed: benzene ring c1ccccc1, amide [CX3](=O)[NX3], carboxylic acid
    [CX3](=O)[OX2H1], ester [#6][CX3](=O)[OX2H0][#6], ketone [#6][CX3](=O)[#6], hydroxyl [OX2H][CX4,c],
    primary amine [NX3;H2][#6], nitrile C#N, sulfonamide S(=O)(=O)N, fluoro [F], chloro [Cl], bromo [Br],
    ether [OD2]([#6])[#6]. Invalid SMILES, molecules with none of the groups and duplicates are skipped and
    counted.
    """
    stats = write_molecule_records(settings.smiles, settings.output, n=settings.n, seed=settings.seed)
    print(stats.summary("records", settings.output, "molecules read"))
    return stats.__dict__


class MoleculeTask(Task):
    """Design a molecule with a given formula and functional groups; answers checked with RDKit."""

    name = "molecules"
    summary = ("greedy answers to molecule-design prompts, checked with RDKit: validity, formula match, "
               "functional-group recall and match, exact match of the canonical SMILES, mean Tanimoto similarity to "
               "the reference (Morgan fingerprints, radius 2, 2048 bits), uniqueness of the valid answers")
    default_test_data = "moses:test"
    max_new_tokens = 96  # a SMILES string is short
    data_settings = MoleculeDataSettings
    data_command = staticmethod(molecules_data_command)

    def examples(self, source: str | None, max_examples: int | None, seed: int) -> list[TaskExample]:
        """Molecule-design prompts from `moses:test`/`moses:train` (records built on the fly, in a seeded order) or
        from a JSONL file written by `caft data molecules` (or any `messages` records whose last assistant turn is
        the reference SMILES; the formula and groups are then read from it)."""
        source = source or self.default_test_data
        if source.startswith("moses:"):
            records = ((f"{source}#{i}", record)
                       for i, record in enumerate(iter_molecule_records(source, max_examples, seed)))
        else:
            records = iter_raw_records(source)
        examples = []
        for where, record, messages in reference_records(records, max_examples):
            meta = record.get("meta") or {}
            reference = meta.get("smiles") or messages[-1]["content"].strip()
            facts = describe_molecule(reference)
            if facts is None:
                raise DataError(where, f"reference SMILES {reference!r} is not a valid molecule", "meta.smiles")
            formula = meta.get("formula", facts.formula)
            groups = list(meta.get("groups", facts.groups))
            examples.append(TaskExample(where, messages[:-1], {"smiles": facts.smiles, "formula": formula,
                                                              "groups": groups}, answer=messages[-1]["content"]))
        if not examples:
            raise DataError(source, "no molecule-design records")
        return examples

    def score(self, examples: list[TaskExample], answers: Mapping[str, str], settings: Any = None,
              progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """`molecule_metrics` over the answers, and one row per example (prompt, output, reference, each check)."""
        checks, rows = [], []
        for example in examples:
            ref = example.reference
            check = check_molecule(answers[example.id], ref["smiles"], ref["formula"], ref["groups"])
            checks.append(check)
            rows.append({"id": example.id, "prompt": example.messages[-1]["content"], "output": answers[example.id],
                         "reference": ref["smiles"], **asdict(check)})
        return molecule_metrics(checks), rows

    def report_metrics(self, rows: Sequence[Mapping[str, Any]]) -> list[ReportMetric]:
        return [
            ReportMetric("validity", "the answer parses as a molecule (RDKit).", "valid"),
            ReportMetric("formula_match", "the molecule has exactly the requested molecular formula.",
                         "formula_match"),
            ReportMetric("group_recall", "fraction of the requested functional groups present (0 for an invalid "
                                         "answer).", "group_recall", rate=False, unit="fraction of the groups"),
            ReportMetric("groups_match", "every requested functional group is present.", "groups_match"),
            ReportMetric("exact_match", "the canonical SMILES equals the reference molecule's.", "exact_match"),
            ReportMetric("tanimoto", "Tanimoto similarity to the reference of Morgan fingerprints (radius 2, 2048 "
                                     "bits); 0 when invalid.", "tanimoto", rate=False, unit="similarity, 0 to 1"),
            ReportMetric("uniqueness", "distinct valid molecules / valid answers.", "valid",
                         distinct_of="canonical_smiles"),
        ]

    def headline_metrics(self) -> dict[str, str]:
        # uniqueness shows what the others hide: a short fine-tuning may give one valid molecule to most prompts
        return {"validity": "valid SMILES", "formula_match": "formula match", "groups_match": "all groups present",
                "uniqueness": "distinct / valid answers"}
