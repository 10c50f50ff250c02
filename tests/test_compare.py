"""`caft compare` on tiny runs: both arms trained alike, scored on the same examples, reported, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caftkit.cli import main
from caftkit.compare import COMPARISON_FILE, REPORT_FILE, TIMINGS_FILE, CompareSettings, compare
from caftkit.finetuning import RUN_FILE
from caftkit.head_training import HeadTrainingSettings, train_heads
from caftkit.task_eval import GENERATIONS_FILE, molecule_examples
from caftkit.tasks.molecules import describe_molecule, molecule_record
from tiny_models import saved_model_dir, tiny_model

TRAIN = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "CC#N", "CC(C)O", "OCC(O)CO", "CC(=O)N", "Oc1ccccc1", "CCOC"]
TEST = ["CCO", "Oc1ccccc1", "OC(=O)c1ccccc1", "CC#N", "CCN", "CC(=O)N"]


def write_records(path, smiles: list[str], repeat: int = 1):
    path.write_text("".join(json.dumps(molecule_record(describe_molecule(s))) + "\n" for s in smiles * repeat))
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-compare")
    model_dir = saved_model_dir(root / "model", tiny_model("llama"))
    train = write_records(root / "train.jsonl", TRAIN, repeat=2)
    test = write_records(root / "test.jsonl", TEST)
    train_heads(str(root / "heads"), HeadTrainingSettings(model=str(model_dir), data=str(train), num_heads=2,
                                                           epochs=1, batch_size=4, eval_fraction=0.25,
                                                           mixed_precision="no"), progress=False)
    return root


def settings_for(root, **overrides) -> CompareSettings:
    values = dict(train_data=str(root / "train.jsonl"), model=str(root / "model"), test_data=str(root / "test.jsonl"),
                  heads=str(root / "heads"), test_examples=None, max_new_tokens=6, n_resamples=2000,
                  finetune={"num_heads": 2, "epochs": 1, "batch_size": 4, "eval_fraction": 0.2, "learning_rate": 3e-3,
                            "lora_r": 4, "lora_alpha": 8, "save_steps": 2})
    values.update(overrides)
    return CompareSettings(**values)


# Answers given to the six test molecules: the evaluation scores these instead of generating.
NTP_ANSWERS = ["CCO", "C1CC", "C1CC", "CC", "CCN", "C1CC"]             # valid 3/6, exact 2/6
CAFT_ANSWERS = ["OCC", "Oc1ccccc1", "OC(=O)c1ccccc1", "CC#N", "CCN", "CCN"]  # valid 6/6, exact 5/6


def test_comparison_trains_both_arms_alike_and_reports_the_paired_difference(tiny_setup, tmp_path):
    output = tmp_path / "compare"
    settings = settings_for(tiny_setup)
    ids = [example.id for example in molecule_examples(settings.test_data)]
    for arm, answers in (("ntp", NTP_ANSWERS), ("caft", CAFT_ANSWERS)):
        eval_dir = output / "seed-0" / arm / "eval"
        eval_dir.mkdir(parents=True)
        (eval_dir / GENERATIONS_FILE).write_text("".join(json.dumps({"id": i, "output": a}) + "\n"
                                                         for i, a in zip(ids, answers)))
    result = compare(str(output), settings, progress=False)

    runs = {arm: json.loads((output / "seed-0" / arm / "run" / RUN_FILE).read_text()) for arm in ("ntp", "caft")}
    assert runs["ntp"]["settings"]["mode"] == "ntp" and runs["caft"]["settings"]["mode"] == "caft"
    # The same budget: data, steps, batch, learning rate and seed; only the loss differs.
    for key in ("optimizer_steps", "train_examples", "held_out_examples"):
        assert runs["ntp"][key] == runs["caft"][key], key
    for key in ("data", "epochs", "batch_size", "learning_rate", "seed", "method", "lora_r"):
        assert runs["ntp"]["settings"][key] == runs["caft"]["settings"][key], key
    assert runs["caft"]["head_warmup"]["warmed_up"] is True
    assert (output / "seed-0" / "caft" / "model" / "config.json").exists()

    rows = {row["metric"]: row for row in result["rows"]}
    assert rows["validity"]["ntp"] == pytest.approx(3 / 6) and rows["validity"]["caft"] == pytest.approx(1.0)
    assert rows["exact_match"]["ntp"] == pytest.approx(2 / 6) and rows["exact_match"]["caft"] == pytest.approx(5 / 6)
    assert rows["exact_match"]["difference"] == pytest.approx(3 / 6)
    # Uniqueness: ntp has CCO, CC, CCN (3 of 3 distinct); caft repeats CCN (5 distinct of 6).
    assert rows["uniqueness"]["ntp"] == pytest.approx(1.0) and rows["uniqueness"]["caft"] == pytest.approx(5 / 6)
    # The interval is the paired bootstrap of the per-example differences.
    diffs = np.array([1, 0, 0, 1, 0, 1]) - np.array([1, 0, 0, 0, 1, 0])  # caft - ntp exact match per example
    assert rows["exact_match"]["low"] <= diffs.mean() <= rows["exact_match"]["high"]
    report = (output / REPORT_FILE).read_text()
    assert "| exact_match | 33.3% | 83.3% | +50.0 pp |" in report
    assert f"optimizer steps per run={runs['caft']['optimizer_steps']}" in report
    assert (output / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((output / COMPARISON_FILE).read_text())["rows"] == result["rows"]

    # A rerun redoes nothing: no stage is timed again and the runs are untouched.
    timings = (output / TIMINGS_FILE).read_text()
    stamp = (output / "seed-0" / "caft" / "run" / RUN_FILE).stat().st_mtime_ns
    assert compare(str(output), settings, progress=False)["rows"] == result["rows"]
    assert (output / TIMINGS_FILE).read_text() == timings
    assert (output / "seed-0" / "caft" / "run" / RUN_FILE).stat().st_mtime_ns == stamp


def test_compare_command_checks_its_settings(tiny_setup, tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text(f"train_data: {tiny_setup / 'train.jsonl'}\nmodel: {tiny_setup / 'model'}\n"
                      "finetune: {mode: caft}\n")
    assert main(["compare", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "finetune settings ['mode'] are set by compare itself" in capsys.readouterr().err
    assert main(["compare", "--train-data", "x.jsonl", "--finetune", "{epochz: 1}"]) == 2
    assert "unknown finetune settings ['epochz']" in capsys.readouterr().err
    assert main(["compare", "--train-data", "x.jsonl", "--task", "loss"]) == 2
    assert "task must be one of molecules, humaneval" in capsys.readouterr().err
