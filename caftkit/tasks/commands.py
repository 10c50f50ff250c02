"""The `caft data molecules` command.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

from .molecules import MoleculeDataSettings


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
    from .molecules import write_molecule_records

    stats = write_molecule_records(settings.smiles, settings.output, n=settings.n, seed=settings.seed)
    skipped = ", ".join(f"{count} {reason}" for reason, count in stats.skipped.items()) or "none"
    print(f"{stats.written} records written to {settings.output} from {stats.read} molecules read; "
          f"skipped: {skipped}")
    return stats.__dict__
