"""`caft compare` on tiny runs: both arms trained alike, scored on the same examples, reported, resumable."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.cli import main
from caftkit.core.heads import attach_heads
from caftkit.data import tokenize_conversation
from caftkit.evaluation.head_metrics import head_metrics
from caftkit.evaluation.task_eval import GENERATIONS_FILE
from caftkit.models import load_model, load_tokenizer
from caftkit.tasks.molecules import describe_molecule, molecule_record
from caftkit.tasks.registry import get_task
from caftkit.training.finetuning import RUN_FILE
from caftkit.training.head_training import HeadTrainingSettings, train_heads
from caftkit.workflows.compare import COMPARISON_FILE, TIMINGS_FILE, CompareSettings, StageTimings, compare
from caftkit.workflows.compare_report import REPORT_FILE

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
    write_records(root / "test.jsonl", TEST)
    train_heads(str(root / "heads"), HeadTrainingSettings(model=str(model_dir), data=str(train), num_aux_heads=2,
                                                           epochs=1, batch_size=4, eval_fraction=0.25,
                                                           mixed_precision="no"), progress=False)
    return root


def settings_for(root, **overrides) -> CompareSettings:
    values = dict(data=str(root / "train.jsonl"), model=str(root / "model"), test_data=str(root / "test.jsonl"),
                  heads=str(root / "heads"), test_examples=None, max_new_tokens=6, n_resamples=2000,
                  finetune={"num_aux_heads": 2, "epochs": 1, "batch_size": 4, "eval_fraction": 0.2,
                            "learning_rate": 3e-3, "lora_r": 4, "lora_alpha": 8, "save_steps": 2})
    values.update(overrides)
    return CompareSettings(**values)


# Answers given to the six test molecules: the evaluation scores these instead of generating.
NTP_ANSWERS = ["CCO", "C1CC", "C1CC", "CC", "CCN", "C1CC"]             # valid 3/6, exact 2/6
CAFT_ANSWERS = ["OCC", "Oc1ccccc1", "OC(=O)c1ccccc1", "CC#N", "CCN", "CCN"]  # valid 6/6, exact 5/6


def test_comparison_trains_both_arms_alike_and_reports_the_paired_difference(tiny_setup, tmp_path):
    output = tmp_path / "compare"
    settings = settings_for(tiny_setup)
    ids = [example.id for example in get_task("molecules").examples(settings.test_data, None, 0)]
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

    [comparison] = result["comparisons"]
    assert (comparison["arm"], comparison["baseline"], comparison["seeds"]) == ("caft", "ntp", [0])
    rows = {row["metric"]: row for row in comparison["rows"]}
    # Rates in percent, scores in their own units: as the task declares them, whatever values they took here.
    assert {metric: row["percent"] for metric, row in rows.items()} == {
        "validity": True, "formula_match": True, "group_recall": False, "groups_match": True, "exact_match": True,
        "tanimoto": False, "uniqueness": True}
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
    assert (output / "report-caft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((output / COMPARISON_FILE).read_text())["comparisons"] == result["comparisons"]

    # The paper's Ln: both final models under the heads caft fine-tuned with, on the test answers, as caft eval
    # --task loss scores them; Ln = sum_k alpha^(k-2) CE_k.
    [ln] = result["ln"]
    assert (ln["arm"], ln["baseline"], ln["seed"], ln["alpha"], ln["examples"]) == ("caft", "ntp", 0, 0.8, 6)
    heads = output / "seed-0" / "caft" / "run" / "heads"
    conversations = [json.loads(line)["messages"] for line in (output / "ln-conversations.jsonl").read_text()
                     .splitlines()]
    assert [turns[-1]["content"] for turns in conversations] == [describe_molecule(s).smiles for s in TEST]
    tokenizer = load_tokenizer(str(output / "seed-0" / "ntp" / "model"))
    examples = [{"input_ids": t.input_ids, "assistant_masks": t.assistant_masks}
                for t in (tokenize_conversation(tokenizer, turns) for turns in conversations)]
    for role, arm in (("baseline_model", "ntp"), ("arm_model", "caft")):
        model = attach_heads(load_model(str(output / "seed-0" / arm / "model")), str(heads), check_base=False)
        expected = head_metrics(model, examples, pad_token_id=tokenizer.pad_token_id, batch_size=16)
        for k in (1, 2, 3):
            assert ln[role][f"loss_head_{k}"] == pytest.approx(expected[f"head_{k}"]["loss"], rel=1e-5)
        assert ln[role]["ln"] == pytest.approx(expected["head_2"]["loss"] + 0.8 * expected["head_3"]["loss"],
                                               rel=1e-5)
    difference = ln["arm_model"]["ln"] - ln["baseline_model"]["ln"]
    assert (f"| caft | ntp | 0 | {ln['baseline_model']['ln']:.4f} | {ln['arm_model']['ln']:.4f} | "
            f"{difference:+.4f} |") in report
    direction = "as the paper expects" if difference < 0 else "against the paper's expectation"
    assert f"- caft: Ln is lower than ntp's on {int(difference < 0)} of 1 seeds" in report and direction in report

    # A rerun redoes nothing: no stage is timed again and the runs are untouched.
    timings = (output / TIMINGS_FILE).read_text()
    stamp = (output / "seed-0" / "caft" / "run" / RUN_FILE).stat().st_mtime_ns
    assert compare(str(output), settings, progress=False)["comparisons"] == result["comparisons"]
    assert (output / TIMINGS_FILE).read_text() == timings
    assert (output / "seed-0" / "caft" / "run" / RUN_FILE).stat().st_mtime_ns == stamp


def test_a_stage_stopped_and_resumed_counts_the_time_of_every_start(tmp_path):
    path, now = tmp_path / TIMINGS_FILE, [100.0]
    timings = StageTimings(path, flush_interval_s=0.01, clock=lambda: now[0])
    with pytest.raises(KeyboardInterrupt), timings.stage("seed-0/caft/finetune"):
        now[0] += 40.0
        # while the stage runs its time so far reaches the file: a process killed here keeps it
        deadline = time.monotonic() + 30
        while not path.exists() or json.loads(path.read_text()).get("seed-0/caft/finetune") != 40.0:
            assert time.monotonic() < deadline, "the running stage never wrote its time"
            time.sleep(0.01)
        now[0] += 2.5
        raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"seed-0/caft/finetune": 42.5}

    # The resumed comparison adds the time of its own start to what the stopped one recorded.
    resumed = StageTimings(path, flush_interval_s=60, clock=lambda: now[0])
    with resumed.stage("seed-0/caft/finetune"):
        now[0] += 30.0
    with resumed.stage("seed-0/caft/eval"):
        now[0] += 7.5
    assert json.loads(path.read_text()) == {"seed-0/caft/finetune": 72.5, "seed-0/caft/eval": 7.5}
    assert resumed.arm_total("caft") == 80.0 and resumed.arm_total("ntp") == 0


def test_compare_command_checks_its_settings(tiny_setup, tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text(f"data: {tiny_setup / 'train.jsonl'}\nmodel: {tiny_setup / 'model'}\n"
                      "finetune: {mode: caft}\n")
    assert main(["compare", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "finetune settings ['mode'] are set by compare itself" in capsys.readouterr().err
    assert main(["compare", "--data", "x.jsonl", "--finetune", "{epochz: 1}"]) == 2
    assert "unknown finetune settings ['epochz']" in capsys.readouterr().err
    assert main(["compare", "--data", "x.jsonl", "--task", "loss"]) == 2
    assert "caft: error: unknown task 'loss'; expected one of molecules, humaneval, math" in capsys.readouterr().err
    # the old name of --data is refused, naming the current one
    assert main(["compare", "--train-data", "x.jsonl"]) == 2
    assert "caft: error: --train-data was renamed --data (see caft compare --help)" in capsys.readouterr().err


def write_answers(output, settings, arm: str, seed: int, answers: list[str]) -> None:
    """Answers the evaluation of one arm and seed scores instead of generating."""
    ids = [example.id for example in get_task("molecules").examples(settings.test_data, None, 0)]
    eval_dir = output / f"seed-{seed}" / arm / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / GENERATIONS_FILE).write_text("".join(json.dumps({"id": i, "output": a}) + "\n"
                                                     for i, a in zip(ids, answers)))


ARMS = {"ntp": {"mode": "ntp", "seeds": [0, 1]},
        "caft": {"mode": "caft", "seeds": [0, 1]},
        "caft-beta0.5": {"mode": "caft", "seeds": [1], "finetune": {"beta": 0.5}}}


@pytest.mark.long(25)
def test_several_arms_against_one_baseline_share_the_warm_up_and_pair_by_seed(tiny_setup, tmp_path):
    output = tmp_path / "compare"
    settings = settings_for(tiny_setup, arms=ARMS)
    answers = {("ntp", 0): NTP_ANSWERS, ("ntp", 1): ["CCO", "CC", "C1CC", "CC", "CC", "CCO"],
               ("caft", 0): CAFT_ANSWERS, ("caft", 1): ["CCC", "Oc1ccccc1", "CC", "CC#N", "CCN", "CC(=O)N"],
               ("caft-beta0.5", 1): ["C1CC", "C1CC", "C1CC", "CC#N", "CCN", "CC(=O)N"]}
    for (arm, seed), arm_answers in answers.items():
        write_answers(output, settings, arm, seed, arm_answers)
    result = compare(str(output), settings, progress=False)

    runs = {key: json.loads((output / f"seed-{key[1]}" / key[0] / "run" / RUN_FILE).read_text()) for key in answers}
    assert runs[("caft-beta0.5", 1)]["settings"]["beta"] == 0.5 and runs[("caft", 1)]["settings"]["beta"] == 0.01
    assert {runs[key]["settings"]["seed"] for key in answers} == {0, 1}
    # the beta arm's warm-up is caft's of seed 1 (beta does not enter it): copied, not trained again
    shared = json.loads((output / "seed-1" / "caft-beta0.5" / "arm_settings.json").read_text())
    assert shared["warmup_shared_from"] == "caft"
    warm = [(output / "seed-1" / arm / "run" / "warmup-heads" / "heads.safetensors").read_bytes()
            for arm in ("caft", "caft-beta0.5")]
    assert warm[0] == warm[1]
    assert (output / "seed-0" / "caft" / "run" / "warmup-heads" / "heads.safetensors").read_bytes() != warm[0]
    # ... so the two arms fine-tuned with the very same heads, and ntp's model was scored under them once, for
    # caft, and read there for caft-beta0.5 (the same model under the same heads gives the same Ln)
    used = [(output / "seed-1" / arm / "run" / "heads" / name).read_bytes()
            for arm in ("caft", "caft-beta0.5") for name in ("heads.safetensors", "heads_config.json")]
    assert used[:2] == used[2:]
    timings = json.loads((output / TIMINGS_FILE).read_text())
    assert {key for key in timings if "/ln-" in key} == {
        "seed-0/caft/ln-caft", "seed-0/caft/ln-ntp", "seed-1/caft/ln-caft", "seed-1/caft/ln-ntp",
        "seed-1/caft-beta0.5/ln-caft-beta0.5"}
    assert not (output / "seed-1" / "caft-beta0.5" / "ln" / "ntp").exists()
    ln = {(entry["arm"], entry["seed"]): entry for entry in result["ln"]}
    assert set(ln) == {("caft", 0), ("caft", 1), ("caft-beta0.5", 1)}
    assert ln[("caft-beta0.5", 1)]["baseline_model"] == ln[("caft", 1)]["baseline_model"]
    assert ln[("caft-beta0.5", 1)]["baseline_scored_in"] == str(output / "seed-1" / "caft" / "ln" / "ntp")
    assert ln[("caft-beta0.5", 1)]["arm_model"] != ln[("caft", 1)]["arm_model"]  # another model: scored itself

    comparisons = {c["arm"]: c for c in result["comparisons"]}
    assert comparisons["caft"]["baseline"] == "ntp" and comparisons["caft"]["seeds"] == [0, 1]
    assert comparisons["caft-beta0.5"]["baseline"] == "ntp" and comparisons["caft-beta0.5"]["seeds"] == [1]
    exact = {c: {row["metric"]: row for row in comparisons[c]["rows"]}["exact_match"] for c in comparisons}
    # exact matches: ntp 2/6 and 1/6, caft 5/6 and 4/6, caft-beta0.5 (seed 1 only) 3/6
    assert exact["caft"]["ntp_per_seed"] == pytest.approx([2 / 6, 1 / 6])
    assert exact["caft"]["caft_per_seed"] == pytest.approx([5 / 6, 4 / 6])
    assert exact["caft"]["difference"] == pytest.approx(3 / 6)
    assert exact["caft-beta0.5"]["ntp"] == pytest.approx(1 / 6)
    assert exact["caft-beta0.5"]["caft"] == pytest.approx(3 / 6)

    report = (output / REPORT_FILE).read_text()
    assert "## caft against ntp" in report and "## caft-beta0.5 against ntp" in report
    assert "| exact_match | 25.0% | 75.0% | +50.0 pp |" in report
    assert "| 33.3%, 16.7% | 83.3%, 66.7% |" in report  # per-seed values of the two-seed comparison
    # the summary: each arm's mean over its seeds in the comparison, per-seed values in brackets
    assert "| exact_match | 25.0% (33.3%, 16.7%) | 75.0% (83.3%, 66.7%) | 50.0% |" in report
    assert "| caft-beta0.5 | caft | lora | 1 | " in report and "| beta=0.5 | ntp |" in report
    heads_rows = [line for line in report.splitlines() if line.startswith("| caft-beta0.5 | 1 | t+")]
    caft_rows = [line for line in report.splitlines() if line.startswith("| caft | 1 | t+")]
    assert len(heads_rows) == 2  # two auxiliary heads
    # the same warm-up: the same accuracy at the start and after it, another after fine-tuning with another beta
    assert [row.split("|")[4:6] for row in heads_rows] == [row.split("|")[4:6] for row in caft_rows]
    assert (output / "report-caft-beta0.5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the main head's held-out loss and accuracy at the end of each run, per seed and averaged
    for arm, seeds in (("ntp", [0, 1]), ("caft", [0, 1]), ("caft-beta0.5", [1])):
        heads = [runs[(arm, seed)]["held_out_per_head"]["head_1"] for seed in seeds]
        losses = [head["loss"] for head in heads]
        accuracies = [head["accuracy"] for head in heads]
        assert (f"| {arm} | {', '.join(map(str, seeds))} | {', '.join(f'{v:.4f}' for v in losses)} | "
                f"{sum(losses) / len(losses):.4f} | {', '.join(f'{v:.4f}' for v in accuracies)} | "
                f"{sum(accuracies) / len(accuracies):.4f} |") in report


def test_a_finished_step_made_with_other_settings_is_not_reused(tiny_setup, tmp_path):
    output = tmp_path / "compare"
    settings = settings_for(tiny_setup, arms={"ntp": {"mode": "ntp"}})
    write_answers(output, settings, "ntp", 0, NTP_ANSWERS)
    compare(str(output), settings, progress=False)
    # with no CAFT arm the report still counts the examples scored, and says why it has no differences
    report = (output / REPORT_FILE).read_text()
    assert f"**test data**: {tiny_setup / 'test.jsonl'} (6 examples)" in report
    assert "No CAFT arm, so no difference to report" in report and "## Summary" not in report
    changed = settings_for(tiny_setup, arms={"ntp": {"mode": "ntp", "finetune": {"learning_rate": 1e-3}}})
    with pytest.raises(ValueError, match=r"seed-0/ntp: was made with other settings than asked now: .*"
                                         r"learning_rate=0.003 \(asked: 0.001\)"):
        compare(str(output), changed, progress=False)
    with pytest.raises(ValueError, match=r"metrics.json: max_examples=None \(asked: 3\)"):
        compare(str(output), settings_for(tiny_setup, arms={"ntp": {"mode": "ntp"}}, test_examples=3),
                progress=False)
    # the eval batch size and the device do not change what was made: reused
    again = settings_for(tiny_setup, arms={"ntp": {"mode": "ntp"}}, eval_batch_size=2, device="cpu")
    assert compare(str(output), again, progress=False)["comparisons"] == []


def test_finished_arms_are_reused_when_the_head_count_is_left_to_its_default(tiny_setup, tmp_path):
    """Without num_aux_heads each run records the count it used (ntp: the default 4; caft: the 2 its heads folder
    holds): a rerun finds its settings the same and redoes nothing."""
    output = tmp_path / "compare"
    finetune = {key: value for key, value in settings_for(tiny_setup).finetune.items() if key != "num_aux_heads"}
    settings = settings_for(tiny_setup, finetune=finetune)
    for arm, answers in (("ntp", NTP_ANSWERS), ("caft", CAFT_ANSWERS)):
        write_answers(output, settings, arm, 0, answers)
    result = compare(str(output), settings, progress=False)
    runs = {arm: output / "seed-0" / arm / "run" / RUN_FILE for arm in ("ntp", "caft")}
    assert {arm: json.loads(path.read_text())["settings"]["num_aux_heads"] for arm, path in runs.items()} == \
        {"ntp": 4, "caft": 2}
    stamps, timings = {arm: path.stat().st_mtime_ns for arm, path in runs.items()}, (output / TIMINGS_FILE).read_text()
    assert compare(str(output), settings, progress=False)["comparisons"] == result["comparisons"]
    assert {arm: path.stat().st_mtime_ns for arm, path in runs.items()} == stamps
    assert (output / TIMINGS_FILE).read_text() == timings


@pytest.mark.parametrize("arms, message", [
    ({"ntp": {"mode": "ntp"}, "caft": {"mode": "caft", "method": "full"}},
     "arm caft: name its baseline; the ntp arms with method full are none"),
    ({"ntp": {"mode": "ntp"}, "caft": {"mode": "caft", "baseline": "caft"}},
     "arm caft: baseline 'caft' is not an ntp arm of this comparison"),
    ({"ntp": {"mode": "ntp", "seeds": [0]}, "caft": {"mode": "caft", "seeds": [1]}},
     r"arm caft: no seed in common with its baseline ntp \(\[1\] against \[0\]\)"),
    ({"ntp": {"mode": "ntp"}, "caft": {"mode": "caft", "beta": 0.5}}, r"arm caft: unknown settings \['beta'\]"),
    ({"ntp": {"mode": "ntp"}, "caft": {"mode": "caft", "finetune": {"seed": 3}}},
     r"arm caft: finetune settings \['seed'\] are set by compare itself"),
    ({"ntp": {"method": "lora"}}, "arm ntp: give its mode, ntp or caft"),
    ({"../x": {"mode": "ntp"}}, "arm name '../x': use letters"),
    ({"ntp": {"mode": "ntp", "seeds": []}}, "arm ntp: seeds must be a non-empty list"),
    # values of the wrong type, refused before the first arm trains (not a TypeError once earlier arms trained)
    ({"ntp": {"mode": "ntp"}, "caft": {"mode": "caft", "finetune": {"beta": "0.5"}}},
     "beta must be a number, got '0.5'"),
    ({"ntp": {"mode": "ntp", "finetune": {"lora_r": "8"}}}, "lora_r must be an integer, got '8'"),
    ({"ntp": {"mode": "ntp", "finetune": {"num_aux_heads": True}}}, "num_aux_heads must be an integer or none"),
    ({"ntp": {"mode": "ntp", "seeds": "12"}}, "arm ntp: seeds must be a comma-separated list of int, got '12'"),
    ({"ntp": {"mode": "ntp", "seeds": [0.5]}}, r"arm ntp: seeds must be a comma-separated list of int, got \[0.5\]"),
    ({"ntp": {"mode": "ntp", "seeds": [-1]}}, "arm ntp: seeds must be a non-empty list of distinct seeds"),
    ({}, "arms: give at least one arm"),
    ({"ntp": {"mode": "ntp"}, "caft": {"mode": "caft", "heads": None, "head_warmup": "auto"}},
     "arm caft: caft mode needs trained auxiliary heads: pass --heads"),
])
def test_arms_are_checked_before_anything_runs(tiny_setup, arms, message):
    with pytest.raises(ValueError, match=message):
        settings_for(tiny_setup, arms=arms)


def test_a_later_arms_missing_heads_are_found_before_the_first_arm_trains(tiny_setup, tmp_path):
    settings = settings_for(tiny_setup, arms={"ntp": {"mode": "ntp"},
                                              "caft": {"mode": "caft", "heads": str(tmp_path / "missing")}})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing' / 'heads_config.json'}: missing"):
        compare(str(tmp_path / "out"), settings, progress=False)
    assert not (tmp_path / "out").exists()


def test_compare_command_takes_arms_from_the_config(tiny_setup, tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text(f"data: {tiny_setup / 'train.jsonl'}\nmodel: {tiny_setup / 'model'}\n"
                      "arms:\n  ntp: {mode: ntp}\n  caft-full: {mode: caft, method: full}\n")
    assert main(["compare", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "arm caft-full: name its baseline; the ntp arms with method full are none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_arm_is_scored_with_the_comparisons_evaluation_settings(tmp_path):
    """The evaluation settings of an arm come from the comparison's, --allow-unsandboxed included (which, like the
    batch size, does not change what a finished evaluation holds)."""
    settings = settings_for(tmp_path, task="humaneval", eval_batch_size=3, allow_unsandboxed=True)
    scored = settings.eval_settings(tmp_path / "model")
    assert (scored.model, scored.task, scored.batch_size, scored.max_new_tokens, scored.allow_unsandboxed) == (
        str(tmp_path / "model"), "humaneval", 3, 6, True)
    assert settings_for(tmp_path).eval_settings(tmp_path / "model").allow_unsandboxed is False
