"""Model cards: the exported model's and the run folder's parse with huggingface_hub, carry valid metadata (a base
model or dataset only by Hub id, the base's licence), the run's settings, metrics and versions, the citation, and
usage snippets that run as written."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import transformers
import yaml
from huggingface_hub import ModelCard, ModelCardData
from test_finetune import settings_for, tiny_dir, write_task  # noqa: F401  (tiny_dir is a fixture)

from caftkit.cli import main
from caftkit.evaluation.comparison_report import format_value
from caftkit.models import BUNDLED_MODEL, cache_dir
from caftkit.tasks.molecules import describe_molecule, molecule_record
from caftkit.tasks.registry import get_task
from caftkit.training.export import export_run
from caftkit.training.finetuning import RUN_FILE, finetune
from caftkit.training.model_card import CAFT_PAPER, base_license, describe_base, hub_id


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):  # noqa: F811
    """A CAFT LoRA run of the tiny model (whose folder's own card says `license: mit`), exported."""
    root = tmp_path_factory.mktemp("card")
    (tiny_dir / "model" / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    data = write_task(root / "task.jsonl")
    finetune(str(root / "run"), settings_for(tiny_dir, data, epochs=1))  # loaded by path, as `caft finetune` does
    export_run(root / "run", root / "model")
    return root


def test_exported_card_metadata_and_contents(exported, tiny_dir):  # noqa: F811
    card = ModelCard.load(exported / "model" / "README.md")
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data  # the metadata round-trips through the Hub's own class
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "mit"  # the base's
    assert "base_model" not in data and "datasets" not in data  # a local folder and a local file: named in the text
    assert set(data["tags"]) == {"caftkit", "concept-aware-fine-tuning", "multi-token-prediction", "lora"}
    assert data["model_name"] == "CAFT fine-tune of model on task.jsonl"
    text = card.text
    run = json.loads((exported / "run" / RUN_FILE).read_text())
    assert f"the local model `{tiny_dir / 'model'}`" in text
    assert f"`{exported / 'model-heads'}` holds the auxiliary heads" in text
    assert f"{run['train_examples']} training and {run['held_out_examples']} held-out examples" in text
    assert "seed 0" in text and "weights in float32" in text
    for name, metrics in run["held_out_per_head"].items():
        k = int(name.split("_")[1])
        assert f"| {k} | t+{k} | {metrics['loss']:.4f} | {metrics['accuracy']:.4f} |" in text
    assert f"- transformers: {transformers.__version__}" in text
    # the heads' status is the run's: frozen (train_heads off), not warmed up (head_warmup no)
    assert (run["settings"]["train_heads"], run["head_warmup"]) == (False, None)
    assert "they were frozen during fine-tuning, so they predict for the model they were trained on" in text
    assert f"--init {exported / 'model-heads'} --epochs 1" in text and "used, fitted to this model" not in text
    assert "do_sample=False" in text  # the usage example answers as `caft eval` does
    limitations = text.split("## Limitations")[1].split("## ")[0]
    assert f"Fine-tuned on `{run['settings']['data']}` alone" in limitations and "`caft compare`" in limitations
    assert CAFT_PAPER["citation"] in text and "https://arxiv.org/abs/2506.07833" in text


def test_each_claim_of_the_card_is_the_run_record(exported):
    """Each claim of the card's metadata, title and Training section, read back from the text, equals the run's
    record (`caft_run.json`), the export's (`caft_export.json`) and the saved model: base, data, mode and method,
    steps and schedule, dtype, device, LoRA and CAFT settings, the heads and their status."""
    model = exported / "model"
    card = ModelCard.load(model / "README.md")
    run = json.loads((exported / "run" / RUN_FILE).read_text())
    record = json.loads((model / "caft_export.json").read_text())
    s = run["settings"]
    data, text = card.data.to_dict(), card.text
    mode = {"caft": "CAFT", "ntp": "Next-token"}[s["mode"]]
    assert data["model_name"] == f"{mode} fine-tune of {Path(s['model']).name} on {Path(s['data']).name}"
    assert set(data["tags"]) == {"caftkit", "concept-aware-fine-tuning", *(["multi-token-prediction"] if
                                 s["mode"] == "caft" else []), *(["lora"] if s["method"] == "lora" else [])}
    # Hub metadata names only Hub ids: the base and the data are local here, so they are named in the text alone
    assert data.get("base_model") == hub_id(s["model"]) and data.get("datasets") == (
        [s["data"]] if hub_id(s["data"]) else None)
    assert re.search(rf"{mode} fine-tuning of the local model `([^`]+)`, on `([^`]+)`", text).groups() == (
        s["model"], s["data"])

    training = text.split("## Training")[1].split("\n## ")[0]
    found = re.search(r"- data: `([^`]+)`: (\d+) training and (\d+) held-out examples \(held out at random with "
                      r"seed (\d+)\)", training).groups()
    assert found == (s["data"], str(run["train_examples"]), str(run["held_out_examples"]), str(s["seed"]))
    found = re.search(r"- (\w+) fine-tuning, ([\d.]+) epoch\(s\), learning rate ([\d.e+-]+) \((\w+)\), batch "
                      r"(\d+) x (\d+) accumulation, (\d+) optimisation steps, seed (\d+)", training).groups()
    assert (found[0], float(found[1]), float(found[2]), found[3], *map(int, found[4:])) == (
        s["method"], s["epochs"], s["learning_rate"], s["lr_scheduler"], s["batch_size"], s["grad_accum"],
        run["optimizer_steps"], s["seed"])
    dtype, mixed, device = re.search(r"- weights in (\w+), mixed precision `(\w+)`, on `([^`]+)`",
                                     training).groups()
    config = json.loads((model / "config.json").read_text())
    assert dtype == s["dtype"] == record["dtype"] == config.get("dtype", config.get("torch_dtype"))
    assert mixed == run.get("mixed_precision", s["mixed_precision"]) and device == run["device"]
    found = re.search(r"- LoRA rank (\d+), alpha (\d+), dropout ([\d.]+)", training).groups()
    assert (int(found[0]), int(found[1]), float(found[2])) == (s["lora_r"], s["lora_alpha"], s["lora_dropout"])
    found = re.search(r"- CAFT: (\d+) auxiliary heads, alpha ([\d.]+), beta ([\d.]+), schedule `(\w+)`; heads "
                      r"`([^`]+)`, warmed up on the task: (yes|no)", training).groups()
    warmed = bool((run["head_warmup"] or {}).get("warmed_up"))
    assert (int(found[0]), float(found[1]), float(found[2]), *found[3:]) == (
        s["num_aux_heads"], s["alpha"], s["beta"], s["schedule"], s["heads"], "yes" if warmed else "no")

    # the heads: where the export put them, how many, and what they were fitted to
    assert record["heads"] == str(exported / "model-heads") and record["run"] == str(exported / "run")
    assert f"`{record['heads']}` holds the auxiliary heads the run used" in text
    heads_config = json.loads((exported / "model-heads" / "heads_config.json").read_text())
    assert heads_config["num_heads"] == s["num_aux_heads"]
    assert [int(k) for k in re.findall(r"^\| (\d+) \| t\+\d+ \|", text, re.MULTILINE)] == [
        int(name.split("_")[1]) for name in run["held_out_per_head"]] == list(range(1, s["num_aux_heads"] + 2))
    frozen = "frozen during fine-tuning, so they predict for the model they were trained on" in text
    trained_along = "they trained with this model during fine-tuning, so they predict for it" in text
    assert (frozen, trained_along) == (not s["train_heads"], bool(s["train_heads"]))
    assert ("warmed up on the task, then frozen" in text) == warmed


def test_exported_card_snippets_run_as_written(exported):
    """Both Python snippets of the card (plain transformers, and the heads through caftkit) run and print an
    answer."""
    text = ModelCard.load(exported / "model" / "README.md").text
    snippets = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(snippets) == 2
    for snippet in snippets:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(snippet, "card snippet", "exec"), {})
        assert printed.getvalue().strip()


def test_a_card_of_the_bundled_model_names_its_hub_origin_and_heads_trained_along(exported):
    """From the bundled model, `base_model` is the Hub model it was made from; heads trained during fine-tuning are
    said to predict for this model, heads warmed up then frozen are not."""
    from caftkit.training.model_card import exported_model_card

    run = json.loads((exported / "run" / RUN_FILE).read_text())
    run["settings"] = {**run["settings"], "model": BUNDLED_MODEL, "train_heads": True}
    card = exported_model_card(run, "model", "model-heads")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert "they trained with this model during fine-tuning, so they predict for it" in card.text
    run["settings"]["train_heads"], run["head_warmup"] = False, {"warmed_up": True}
    assert "they were warmed up on the task, then frozen during fine-tuning" in exported_model_card(
        run, "model", "model-heads").text


def test_run_folder_card_says_caft_and_names_the_base(exported, tiny_dir):  # noqa: F811
    card = ModelCard.load(exported / "run" / "README.md")
    assert "caftkit" in card.data.tags and "base_model" not in card.data.to_dict()
    assert "# A caftkit CAFT fine-tuning run" in card.text
    assert f"the local model `{tiny_dir / 'model'}`" in card.text
    assert "[None]" not in card.text and "caft export" in card.text


def test_lora_adapter_folders_get_caftkit_cards_not_peft_templates(exported, tiny_dir):  # noqa: F811
    """`final/` (and each checkpoint) of a LoRA run is an adapter a user may load or push with PEFT: its card says
    what it adapts and how to load and export it, with valid metadata, instead of PEFT's blank template."""
    run = exported / "run"
    folders = [run / "final", *sorted(run.glob("checkpoint-*"))]
    for folder in folders:
        assert (folder / "adapter_config.json").exists(), folder
        card = ModelCard.load(folder / "README.md")
        data = card.data.to_dict()
        assert data["library_name"] == "peft" and "base_model" not in data  # a local folder is no Hub id
        assert "lora" in data["tags"] and "caftkit" in data["tags"]
        assert "# A caftkit CAFT fine-tuning adapter" in card.text
        assert f"the local model `{tiny_dir / 'model'}`" in card.text
        assert "PeftModel.from_pretrained" in card.text and "More Information Needed" not in card.text


def test_hub_ids_licences_and_the_bundled_model(tmp_path, monkeypatch):
    """A base is metadata only as a Hub id; its licence comes from its card in the local Hub cache (never
    downloaded), and the bundled model's provenance and licence are caftkit's own record."""
    assert hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub_id("owner/name") is None  # a folder of that name is here
    assert hub_id(BUNDLED_MODEL) is None and hub_id("data.jsonl") is None and hub_id(None) is None
    snapshot = tmp_path / "hub" / "models--org--base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    (tmp_path / "hub" / "models--org--base" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--base" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_license("org/base") == "llama3.1"
    assert base_license("org/absent") is None
    assert base_license(BUNDLED_MODEL) == "apache-2.0"
    assert base_license(str(cache_dir() / "models" / BUNDLED_MODEL)) == "apache-2.0"
    assert "Q4_1 GGUF, converted back to float32" in describe_base(BUNDLED_MODEL)
    assert describe_base("org/base") == "[org/base](https://huggingface.co/org/base)"


def test_the_readme_cites_what_the_cards_cite():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert CAFT_PAPER["citation"] in readme and f"https://arxiv.org/abs/{CAFT_PAPER['id']}" in readme


# A card's task metrics: `caft eval` on an export, then `caft export --eval` of that evaluation.

def write_math_problems(path, answers: list[str]):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                     {"role": "assistant", "content": answer}]}) + "\n"
                            for i, answer in enumerate(answers)))
    return path


def write_molecule_problems(path, smiles: list[str]):
    path.write_text("".join(json.dumps(molecule_record(describe_molecule(s))) + "\n" for s in smiles))
    return path


@pytest.fixture(scope="module")
def evaluated(exported):
    """The run exported to `model-eval`, evaluated there by `caft eval` on math and on molecules."""
    model = exported / "model-eval"
    export_run(exported / "run", model)
    math_data = write_math_problems(exported / "math-test.jsonl", ["1", "2", "3"])
    molecule_data = write_molecule_problems(exported / "molecules-test.jsonl", ["CCO", "Oc1ccccc1", "CC#N"])
    commands = {task: ["eval", "--model", str(model), "--task", task, "--data", str(data), "--max-new-tokens", tokens,
                       "--n-resamples", "200", "--output", str(exported / f"eval-{task}")]
                for task, data, tokens in (("math", math_data, "4"), ("molecules", molecule_data, "6"))}
    for command in commands.values():
        assert main(command) == 0
    # The tiny model answers no problem right: as if it had answered two of three, so that the values and intervals
    # the card must carry are not all 0. A rerun scores the answers in the folder again.
    generations = exported / "eval-math" / "generations.jsonl"
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    answers = {"1": "1", "2": "It is 2.", "3": "4"}  # by line: the references are 1, 2 and 3
    generations.write_text("".join(json.dumps({**row, "output": answers[row["id"].rsplit(":", 1)[-1]]}) + "\n"
                                   for row in rows))
    assert main(commands["math"]) == 0
    return exported


def test_export_with_eval_puts_the_metrics_of_each_evaluation_into_the_card(evaluated, capsys):
    """Exported again into its own folder with both evaluations, the card's model-index holds every metric of
    each `metrics.json` (value as recorded), parses with the Hub's own classes, and the Evaluation table shows each
    value with its interval, examples and decoding as recorded."""
    model, folders = evaluated / "model-eval", [evaluated / "eval-math", evaluated / "eval-molecules"]
    export_before = json.loads((model / "caft_export.json").read_text())
    records = [json.loads((folder / "metrics.json").read_text()) for folder in folders]
    assert records[0]["metrics"]["exact_match"] == pytest.approx(2 / 3) and records[0]["metrics"]["answered"] == 1
    assert [record["model_export"] for record in records] == [export_before] * 2  # eval kept what it scored
    capsys.readouterr()
    assert main(["export", str(evaluated / "run"), "--output", str(model), "--eval",
                 ",".join(map(str, folders))]) == 0
    assert f"its card reports the evaluations in {folders[0]}, {folders[1]}" in capsys.readouterr().out
    export_after = json.loads((model / "caft_export.json").read_text())
    assert {key: export_after[key] for key in ("run", "dtype", "run_fingerprint")} == {
        key: export_before[key] for key in ("run", "dtype", "run_fingerprint")}  # the same weights
    run = json.loads((evaluated / "run" / RUN_FILE).read_text())
    assert export_after["dtype"] == run["settings"]["dtype"]

    card = ModelCard.load(model / "README.md")  # parses the model-index strictly: a broken one raises
    front_matter = yaml.safe_load((model / "README.md").read_text().split("---\n")[1])
    (entry,) = front_matter["model-index"]
    assert entry["name"] == "CAFT fine-tune of model on task.jsonl"
    expected = {}
    for record in records:
        task, data = record["task"], record["settings"]["data"]
        labels = get_task(task).headline_metrics()
        expected[(task, f"{task} ({data})")] = [
            {"type": interval["metric"], "value": interval["value"],
             "name": labels.get(interval["metric"], interval["metric"])}
            for interval in record["intervals"] if math.isfinite(interval["value"])]
    results = {(result["dataset"]["type"], result["dataset"]["name"]): result for result in entry["results"]}
    assert set(results) == set(expected)
    for key, metrics in expected.items():
        assert results[key]["task"] == {"type": "text-generation"}
        assert results[key]["metrics"] == metrics  # each value exactly as its metrics.json records it
    assert len(card.data.eval_results) == sum(map(len, expected.values()))
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()

    evaluation = card.text.split("## Evaluation")[1].split("\n## ")[0]
    for folder, record in zip(folders, records):
        settings = record["settings"]
        assert f"- `{folder}`: {record['task']} on `{settings['data']}`, the model `{model}`" in evaluation
        for interval in record["intervals"]:
            assert interval["confidence"] == 0.95 and interval["n_examples"] == record["metrics"]["n"] == 3
            if interval["metric"] in record["metrics"]:
                assert interval["value"] == pytest.approx(record["metrics"][interval["metric"]], abs=1e-12)
            low, value, high = (format_value(interval[key], interval["rate"]) if math.isfinite(interval[key])
                                else "n/a" for key in ("low", "value", "high"))
            assert (f"| {record['task']} | `{settings['data']}` | {interval['metric']} | {value} | [{low}, {high}] | "
                    f"3 | greedy, at most {settings['max_new_tokens']} new tokens, weights in {settings['dtype']} |"
                    ) in evaluation
    assert "| task | test data | metric | value | 95% interval | examples | decoding |" in evaluation
    assert "- molecules, formula_match: the molecule has exactly the requested molecular formula." in evaluation
    assert "- math, exact_match: " in evaluation and "- molecules, exact_match: the canonical SMILES" in evaluation
    limitations = card.text.split("## Limitations")[1].split("## ")[0]
    assert "The task metrics under Evaluation hold for its greedy answers" in limitations
    # the plain export's card says where such metrics come from, and has none
    plain = ModelCard.load(evaluated / "model" / "README.md")
    assert plain.data.eval_results is None and "## Evaluation" not in plain.text
    assert "`caft export --eval` writes them into this card" in plain.text


def test_export_refuses_an_evaluation_of_another_model_naming_both(evaluated, tmp_path, capsys):
    """An evaluation of the base model, of an export in another dtype, or of another run's export, and one of the
    heads' losses, are refused in one line before anything is written."""
    run = evaluated / "run"
    base = json.loads((run / RUN_FILE).read_text())["settings"]["model"]
    math_data = evaluated / "math-test.jsonl"
    assert main(["eval", "--model", base, "--task", "math", "--data", str(math_data), "--max-new-tokens", "2",
                 "--n-resamples", "100", "--output", str(tmp_path / "eval-base")]) == 0
    assert main(["eval", "--model", str(evaluated / "model-eval"), "--task", "loss", "--data",
                 str(evaluated / "task.jsonl"), "--max-examples", "2", "--output", str(tmp_path / "eval-loss")]) == 0
    other_run = tmp_path / "other-run"
    shutil.copytree(run, other_run)
    (other_run / RUN_FILE).write_text((run / RUN_FILE).read_text() + "\n")  # another training's record
    # an evaluation of other-run's export, after which other-run trains again (its record changes)
    export_run(other_run, tmp_path / "other-model")
    assert main(["eval", "--model", str(tmp_path / "other-model"), "--task", "math", "--data", str(math_data),
                 "--max-new-tokens", "2", "--n-resamples", "100", "--output", str(tmp_path / "eval-other")]) == 0
    (other_run / RUN_FILE).write_text((other_run / RUN_FILE).read_text() + "\n")
    out = tmp_path / "model"
    eval_math = evaluated / "eval-math"
    cases = [
        ([str(run), "--eval", str(tmp_path / "eval-base")],
         f"{tmp_path / 'eval-base'}: an evaluation of {base}, not of {out}, the export of {run} in float32 (it is no "
         "caft export): evaluate an export of this run with `caft eval` and give that folder to --eval"),
        ([str(run), "--dtype", "bfloat16", "--eval", str(eval_math)],
         f"{eval_math}: an evaluation of {evaluated / 'model-eval'}, not of {out}, the export of {run} in bfloat16 "
         "(it was exported in float32)"),
        ([str(other_run), "--eval", str(eval_math)],
         f"{eval_math}: an evaluation of {evaluated / 'model-eval'}, not of {out}, the export of {other_run} in "
         f"float32 (it was exported from {run})"),
        ([str(other_run), "--eval", str(tmp_path / "eval-other")],
         f"{tmp_path / 'eval-other'}: an evaluation of {tmp_path / 'other-model'}, not of {out}, the export of "
         f"{other_run} in float32 (it was exported from {other_run} before that run was trained again)"),
        ([str(run), "--eval", str(tmp_path / "eval-loss")],
         f"{tmp_path / 'eval-loss' / 'metrics.json'}: field 'task': loss, the heads' losses on conversations"),
        ([str(run), "--eval", f"{eval_math},{evaluated / 'eval-math' / '..' / 'eval-math'}"],
         f"{eval_math}: given to --eval more than once"),
        ([str(run), "--eval", str(tmp_path / "absent")],
         f"{tmp_path / 'absent' / 'metrics.json'}: missing; is {tmp_path / 'absent'} a folder `caft eval` wrote?"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["export", *args[:1], "--output", str(out), *args[1:]]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"caft: error: {message}") and "\n" not in error, error
        assert not out.exists() and not (tmp_path / "model-heads").exists()
    # the same weights exported to a new folder take the evaluation of the earlier export
    assert main(["export", str(run), "--output", str(out), "--eval", str(eval_math)]) == 0
    assert ModelCard.load(out / "README.md").data.eval_results


def test_export_refuses_evaluations_written_before_their_records(evaluated, tmp_path, capsys):
    """An evaluation written by a caftkit that kept no intervals, or of an export that recorded no fingerprint of
    its run, cannot be checked or reported: each is refused with what to run again."""
    run, out = evaluated / "run", tmp_path / "model"
    record = json.loads((evaluated / "eval-math" / "metrics.json").read_text())
    older = {"no-intervals": {key: value for key, value in record.items() if key != "intervals"},
             "no-fingerprint": {**record, "model_export": {key: value for key, value in record["model_export"].items()
                                                           if key != "run_fingerprint"}}}
    messages = {"no-intervals": f"{tmp_path / 'no-intervals' / 'metrics.json'}: field 'intervals': none recorded (a "
                                "caftkit before the intervals wrote it): run the same `caft eval` command again",
                "no-fingerprint": f"{tmp_path / 'no-fingerprint'}: an evaluation of {evaluated / 'model-eval'}, not "
                                  f"of {out}, the export of {run} in float32 (its caft_export.json, from an older "
                                  "caftkit, has no fingerprint of its run; export it again)"}
    for name, metrics in older.items():
        shutil.copytree(evaluated / "eval-math", tmp_path / name)
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
        capsys.readouterr()
        assert main(["export", str(run), "--output", str(out), "--eval", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.startswith(f"caft: error: {messages[name]}")
        assert not out.exists()
