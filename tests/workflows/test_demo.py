"""The demo's scoring of the base model and the two fine-tuned ones, and the table it prints."""

from __future__ import annotations

import json

import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.evaluation.task_eval import GENERATIONS_FILE
from caftkit.tasks.molecules import describe_molecule, molecule_record
from caftkit.tasks.registry import get_task
from caftkit.workflows.demo import format_scores, score_held_out

HELD_OUT = ["CCO", "Oc1ccccc1", "CC#N", "CCN"]


def scored(tmp_path, name: str, answers: list[str]) -> dict:
    """The demo's scores of `answers` to the held-out molecules (given instead of generated)."""
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(json.dumps(molecule_record(describe_molecule(s))) + "\n" for s in HELD_OUT))
    output = tmp_path / name
    output.mkdir()
    ids = [example.id for example in get_task("molecules").examples(str(held_out), None, 0)]
    (output / GENERATIONS_FILE).write_text("".join(json.dumps({"id": i, "output": a}) + "\n"
                                                   for i, a in zip(ids, answers)))
    model = tmp_path / "model"
    if not model.exists():
        saved_model_dir(model, tiny_model("llama"))
    return score_held_out(str(model), held_out, output, "cpu")


def test_the_table_shows_how_many_valid_answers_are_distinct(tmp_path):
    base = scored(tmp_path, "base", ["hello", "C1CC", "the answer", "CC"])  # one valid: CC
    tuned = scored(tmp_path, "tuned", ["CCO", "CCO", "CC#N", "CCO"])      # all valid, two distinct
    assert (base["prompts"], base["validity"], base["uniqueness"]) == (4, 0.25, 1.0)
    assert (tuned["validity"], tuned["formula_match"], tuned["groups_match"]) == (1.0, 0.5, 0.5)
    assert tuned["uniqueness"] == pytest.approx(2 / 4)
    assert [example["answer"] for example in tuned["examples"]] == ["CCO", "CCO", "CC#N"]
    ntp = scored(tmp_path, "ntp", ["CCO", "CCN", "C#N", "hello"])  # three valid, all distinct; C#N has CC#N's nitrile
    assert format_scores({"base": base, "ntp": ntp, "caft": tuned}).splitlines() == [
        "4 held-out MOSES test molecules base model   next-token FT   CAFT FT",
        "  valid SMILES                          0.25            0.75      1.00",
        "  formula match                         0.00            0.25      0.50",
        "  all groups present                    0.00            0.50      0.50",
        "  distinct / valid answers              1.00            1.00      0.50",
    ]


def test_the_commands_the_demo_prints_run_in_a_shell_that_did_not_activate_the_venv(monkeypatch, tmp_path):
    """`make demo` runs `.venv/bin/caft` without activating .venv: the printed commands name the script's path,
    which runs as printed; with the venv active (its bin first on PATH), the plain name."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from caftkit.workflows.commands import runnable

    bin_dir = Path(sys.executable).parent
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    printed = runnable("caft")
    assert printed != "caft" and Path(printed).resolve() == (bin_dir / "caft").resolve()
    done = subprocess.run([*printed.split(), "--version"], capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.startswith("caft ")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert runnable("caft") == "caft"
