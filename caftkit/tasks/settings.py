"""The settings of the tasks' `caft data` commands (molecules, math), declared once with their help and checks
(nothing here imports torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..settings import MAX_SEED, check_settings, setting

FAMILIES = ("gsm_symbolic", "chain_sum", "products")


@dataclass(kw_only=True)
class MoleculeDataSettings:
    """What `caft data molecules` builds: from which SMILES, how many records, in which order, into which file."""

    output: str = setting(help="JSONL file to write.", formerly=("out",))
    smiles: str = setting("moses:train", help="moses:train or moses:test (the MOSES sets of the molsets package), a "
                                              "text file with one SMILES per line, or a CSV file with a SMILES column "
                                              "(optionally .gz).")
    n: int | None = setting(1000, help="number of records (molecules drawn in a seeded random order); 0 or none for "
                                       "all.", minimum=0)
    seed: int = setting(0, help="seed of the order.", minimum=0, maximum=MAX_SEED)
    replace: bool = setting(False, help="replace an existing --output file; without it an existing file is refused "
                                        "and left as it is.")

    def __post_init__(self):
        check_settings(self)
        if self.n == 0:
            self.n = None
        if Path(self.output).exists() and not self.replace:
            raise ValueError(f"{self.output}: exists: choose another --output, or --replace it")


@dataclass(kw_only=True)
class MathDataSettings:
    """What `caft data math` builds: which family of problems, how many, from which seed, into which file."""

    output: str = setting(help="JSONL file to write.")
    family: str = setting("chain_sum", help="gsm_symbolic (word problems, answered with a worked solution ending in "
                                            "'#### <number>'), chain_sum (sums and differences) or products; the "
                                            "arithmetic families are answered with the number only.",
                          choices=FAMILIES)
    n: int = setting(1000, help="number of problems written (repeats and excluded problems are drawn past).",
                     minimum=1)
    seed: int = setting(0, help="reasoning-gym seed: problem i is drawn from seed + i, so sets whose seeds are "
                                "closer than their sizes share problems unless --exclude removes them.",
                        minimum=0, maximum=MAX_SEED)
    min_terms: int = setting(2, help="arithmetic families: fewest numbers in a problem.", minimum=1)
    max_terms: int = setting(2, help="arithmetic families: most numbers in a problem.", minimum=1)
    min_digits: int = setting(1, help="arithmetic families: fewest digits of a number.", minimum=1)
    max_digits: int = setting(3, help="arithmetic families: most digits of a number.", minimum=1, maximum=18)
    exclude: list[str] = setting(default_factory=list, help="math record files (e.g. the test set) whose problems "
                                                            "are left out and counted, comma-separated.")
    replace: bool = setting(False, help="replace an existing --output file; without it an existing file is refused "
                                        "and left as it is.")

    def __post_init__(self):
        check_settings(self)
        if self.min_terms > self.max_terms:
            raise ValueError(f"min_terms {self.min_terms} is above max_terms {self.max_terms}")
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits {self.min_digits} is above max_digits {self.max_digits}")
        if Path(self.output).exists() and not self.replace:
            raise ValueError(f"{self.output}: exists: choose another --output, or --replace it")
        for path in self.exclude:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: --exclude file not found")
            if Path(path).resolve() == Path(self.output).resolve():
                raise ValueError(f"{path}: is the --output itself; exclude another set")
