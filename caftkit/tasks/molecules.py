"""The molecule-design task: from a molecular formula and functional groups, answer with a SMILES string.

Multi-token functional groups (`C(=O)O`, `c1ccccc1`, `C#N`) are what concept-aware fine-tuning is meant to
help with. Records are built from SMILES with RDKit: the user asks for a molecule with the molecule's formula
containing the groups it has, and the assistant answers with the canonical SMILES. The groups are fixed
(name: SMARTS) and listed in `FUNCTIONAL_GROUPS`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DataError, skipped_text
from ..files.atomic import atomic_path
from ..files.package_data import package_file
from .task import RecordStats

# Name -> SMARTS, in the order groups are named in prompts.
FUNCTIONAL_GROUPS: dict[str, str] = {
    "benzene ring": "c1ccccc1",
    "amide": "[CX3](=O)[NX3]",
    "carboxylic acid": "[CX3](=O)[OX2H1]",
    "ester": "[#6][CX3](=O)[OX2H0][#6]",
    "ketone": "[#6][CX3](=O)[#6]",
    "hydroxyl": "[OX2H][CX4,c]",
    "primary amine": "[NX3;H2][#6]",
    "nitrile": "C#N",
    "sulfonamide": "S(=O)(=O)N",
    "fluoro": "[F]",
    "chloro": "[Cl]",
    "bromo": "[Br]",
    "ether": "[OD2]([#6])[#6]",
}

MOSES_SPLITS = ("train", "test")
_MOSES_PACKAGE = "moses"
_MOSES_DATA = "dataset/data"


def rdkit_modules():
    """RDKit's `Chem` and `rdMolDescriptors`, its per-molecule log silenced; one clear error when it is missing."""
    try:
        # deferred: caft starts without RDKit
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdMolDescriptors
    except ImportError:  # pragma: no cover - rdkit is a dependency; this names the fix if it is missing
        raise ImportError("the molecule task needs RDKit: pip install rdkit") from None
    RDLogger.DisableLog("rdApp.*")  # invalid SMILES are counted, not printed one by one
    return Chem, rdMolDescriptors


_PATTERNS: dict[str, Any] = {}


def _patterns() -> dict[str, Any]:
    if not _PATTERNS:
        Chem, _ = rdkit_modules()
        for name, smarts in FUNCTIONAL_GROUPS.items():
            _PATTERNS[name] = Chem.MolFromSmarts(smarts)
    return _PATTERNS


@dataclass(frozen=True)
class MoleculeFacts:
    """What the task states about a molecule: canonical SMILES, molecular formula, functional groups."""

    smiles: str
    formula: str
    groups: tuple[str, ...]


def describe_molecule(smiles: str) -> MoleculeFacts | None:
    """Canonical SMILES, formula and functional groups of `smiles`; None when RDKit cannot parse it."""
    Chem, rdMolDescriptors = rdkit_modules()
    molecule = Chem.MolFromSmiles(smiles) if smiles else None
    if molecule is None:
        return None
    groups = tuple(name for name, pattern in _patterns().items() if molecule.HasSubstructMatch(pattern))
    return MoleculeFacts(Chem.MolToSmiles(molecule), rdMolDescriptors.CalcMolFormula(molecule), groups)


def design_prompt(formula: str, groups: tuple[str, ...]) -> str:
    """The user's request for a molecule with `formula` containing `groups`."""
    return (f"Design a molecule with the molecular formula {formula} that contains these functional groups: "
            f"{', '.join(groups)}. Answer with its SMILES string only.")


def molecule_record(facts: MoleculeFacts) -> dict[str, Any]:
    """The `messages` record of one molecule, with the facts kept in `meta`."""
    return {
        "messages": [
            {"role": "user", "content": design_prompt(facts.formula, facts.groups)},
            {"role": "assistant", "content": facts.smiles},
        ],
        "meta": {"formula": facts.formula, "groups": list(facts.groups), "smiles": facts.smiles},
    }


def moses_file(split: str) -> Path:
    """The MOSES CSV of `split` inside the `molsets` package, found without importing it."""
    if split not in MOSES_SPLITS:
        raise ValueError(f"unknown MOSES split {split!r}; expected one of {', '.join(MOSES_SPLITS)}")
    return package_file(_MOSES_PACKAGE, f"{_MOSES_DATA}/{split}.csv.gz", "molsets", "the MOSES molecules")


def read_smiles(source: str) -> list[tuple[str, str]]:
    """`(where, smiles)` of every molecule in `source`: `moses:train`, `moses:test`, a text file with one
    SMILES per line, or a CSV file with a `SMILES` (or `smiles`) column; `.gz` files are read compressed."""
    path = moses_file(source.split(":", 1)[1]) if source.startswith("moses:") else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SMILES file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    first = text.split("\n", 1)[0].strip()
    header = [name.strip() for name in first.split(",")]
    column = next((i for i, name in enumerate(header) if name.lower() == "smiles"), None)
    molecules = []
    if column is not None:
        for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if number == 1 or not row:
                continue
            if len(row) <= column:
                raise ValueError(f"{path}:{number}: field 'SMILES': missing (the row has {len(row)} columns)")
            molecules.append((f"{path}:{number}", row[column].strip()))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                molecules.append((f"{path}:{number}", line.split()[0]))
    return molecules


def iter_molecule_records(source: str, n: int | None = None, seed: int = 0,
                          stats: RecordStats | None = None) -> Iterator[dict[str, Any]]:
    """Records for up to `n` molecules of `source`, drawn in a seeded random order; SMILES that RDKit cannot
    parse, and molecules with none of the functional groups, are skipped and counted; duplicates are dropped."""
    stats = stats if stats is not None else RecordStats()
    molecules = read_smiles(source)
    random.Random(seed).shuffle(molecules)
    seen: set[str] = set()
    for _, smiles in molecules:
        if n is not None and stats.written >= n:
            return
        stats.read += 1
        facts = describe_molecule(smiles)
        if facts is None:
            stats.skip("invalid SMILES")
            continue
        if not facts.groups:
            stats.skip("none of the functional groups")
            continue
        if facts.smiles in seen:
            stats.skip("duplicate molecule")
            continue
        seen.add(facts.smiles)
        stats.written += 1
        yield molecule_record(facts)


def write_molecule_records(source: str, output: str | os.PathLike, n: int | None = None, seed: int = 0
                           ) -> RecordStats:
    """Write the records of `iter_molecule_records` to a JSONL file (complete or not at all)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stats = RecordStats()
    with atomic_path(output) as staging, staging.open("w", encoding="utf-8") as handle:
        for record in iter_molecule_records(source, n, seed, stats):
            handle.write(json.dumps(record) + "\n")
        if not stats.written:  # refused, and nothing written: an empty file would pass for a data set
            raise DataError(source, f"no usable molecule ({stats.read} read; skipped: {skipped_text(stats.skipped)})")
    return stats


def answer_smiles(answer: str) -> str:
    """The SMILES a generated answer gives: its first whitespace-separated word, without surrounding backticks,
    quotes or sentence punctuation (`.,;`); a leading Markdown code fence and its language tag are skipped.
    Empty when the answer is blank."""
    text = answer.strip()
    if text.startswith("```"):
        # Chat models often fence code; the tag after the fence (```smiles) would otherwise be read as the SMILES.
        text = text[3:].split("\n", 1)[1] if "\n" in text else text[3:]
    words = text.split()
    return words[0].strip("`'\".,;") if words else ""


