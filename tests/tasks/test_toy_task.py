"""A task defined in this one file, registered at run time, goes through `caft data`, `caft eval` and `caft compare`
with nothing else changed: the `Task` interface is all the commands read."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.cli import main
from caftkit.data import iter_raw_records, to_messages
from caftkit.evaluation.task_eval import GENERATIONS_FILE
from caftkit.files.outputs import mark_output_folder
from caftkit.settings import check_settings, setting
from caftkit.tasks.registry import get_task, register_task, unregister_task
from caftkit.tasks.task import ReportMetric, Task, TaskExample
from caftkit.workflows.compare_report import REPORT_FILE

WORDS = ["ab", "cd", "abc", "bcd", "cde", "abcd", "ef", "fgh"]


@dataclass(kw_only=True)
class EchoDataSettings:
    """What `caft data echo` writes."""

    output: str = setting(help="JSONL file to write.")
    n: int = setting(8, help="number of records, cycling through the words.", minimum=1)

    def __post_init__(self):
        check_settings(self)


def echo_data_command(settings: EchoDataSettings) -> dict:
    """Write echo records: the user gives a word, the assistant says it back."""
    words = [WORDS[i % len(WORDS)] for i in range(settings.n)]
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Say {word}"},
                                      {"role": "assistant", "content": word}]}) + "\n" for word in words]
    Path(settings.output).write_text("".join(lines))
    return {"written": len(lines)}


class EchoTask(Task):
    """Say the word back; exact match, by the word's length, and how many of the answers are distinct."""

    name = "echo"
    summary = "say the word given back"
    max_new_tokens = 5
    data_settings = EchoDataSettings
    data_command = staticmethod(echo_data_command)

    def examples(self, source: str | None, max_examples: int | None, seed: int) -> list[TaskExample]:
        examples = []
        for where, record in iter_raw_records(source):
            messages = to_messages(record, where)
            word = messages[-1]["content"]
            examples.append(TaskExample(where, messages[:-1], {"word": word}, answer=word))
        return examples[:max_examples]

    def score(self, examples: list[TaskExample], answers: Mapping[str, str], settings: Any = None,
              progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
        rows = [{"id": example.id, "output": answers[example.id], "said": answers[example.id].strip(),
                 "exact": answers[example.id].strip() == example.reference["word"],
                 "length": len(example.reference["word"]), "nonempty": bool(answers[example.id].strip())}
                for example in examples]
        return {"n": len(rows), "exact": sum(row["exact"] for row in rows) / len(rows)}, rows

    def report_metrics(self, rows: Sequence[Mapping[str, Any]]) -> list[ReportMetric]:
        return [ReportMetric("exact", "the word said back.", "exact"),
                ReportMetric("length", "letters of the word.", "length", rate=False, unit="letters"),
                ReportMetric("exact_3_letters", "exact on the words of 3 letters.", "exact", within=("length", 3)),
                ReportMetric("distinct", "distinct answers / answers.", "nonempty", distinct_of="said")]


@pytest.fixture
def echo_task():
    task = register_task(EchoTask())
    yield task
    unregister_task(task.name)


def test_a_task_in_one_file_runs_data_eval_and_compare(echo_task, tmp_path, capsys):
    model = saved_model_dir(tmp_path / "model", tiny_model("llama"))
    assert main(["data", "echo", "--output", str(tmp_path / "train.jsonl")]) == 0
    # 6 of each word: a breakdown by length then has every group in every bootstrap resample
    assert main(["data", "echo", "--n", "48", "--output", str(tmp_path / "test.jsonl")]) == 0
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 48
    assert main(["eval", "--help"]) == 0
    assert "echo: say the word given back." in capsys.readouterr().out

    assert main(["eval", "--model", str(model), "--task", "echo", "--data", str(tmp_path / "test.jsonl"),
                 "--output", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "examples.jsonl").read_text().splitlines()]
    assert metrics["task"] == "echo" and metrics["settings"]["max_new_tokens"] == 5
    assert metrics["metrics"] == {"n": 48, "exact": sum(row["exact"] for row in rows) / 48}

    # The comparison's answers are given (the tiny model's would all be wrong), so the figures are known.
    compare_dir = tmp_path / "compare"
    ids = [example.id for example in get_task("echo").examples(str(tmp_path / "test.jsonl"), None, 0)]
    # per word of WORDS: ntp says back ab and abc, caft ab, cd, abc and bcd; the rest get x
    answers = {"ntp": ["ab", "x", "abc", "x", "x", "x", "x", "x"] * 6,
               "caft": ["ab", "cd", "abc", "bcd", "x", "x", "x", "x"] * 6}
    mark_output_folder(compare_dir, "compare")  # as a comparison stopped after its evaluations left it
    for arm, said in answers.items():
        (compare_dir / "seed-0" / arm / "eval").mkdir(parents=True)
        (compare_dir / "seed-0" / arm / "eval" / GENERATIONS_FILE).write_text(
            "".join(json.dumps({"id": i, "output": a}) + "\n" for i, a in zip(ids, said)))
    config = tmp_path / "compare.yaml"
    config.write_text(f"model: {model}\ndata: {tmp_path / 'train.jsonl'}\ntask: echo\n"
                      f"test_data: {tmp_path / 'test.jsonl'}\nhead_warmup: 'yes'\nn_resamples: 500\n"
                      "finetune: {num_aux_heads: 1, epochs: 1, batch_size: 4, eval_fraction: 0.25, lora_r: 2}\n")
    assert main(["compare", "--config", str(config), "--output", str(compare_dir)]) == 0
    [comparison] = json.loads((compare_dir / "comparison.json").read_text())["comparisons"]
    rows = {row["metric"]: row for row in comparison["rows"]}
    assert list(rows) == ["exact", "length", "exact_3_letters", "distinct"]
    assert (rows["exact"]["ntp"], rows["exact"]["caft"]) == (pytest.approx(2 / 8), pytest.approx(4 / 8))
    assert rows["length"]["percent"] is False and rows["length"]["difference"] == 0
    # words of 3 letters: abc, bcd, cde, fgh; ntp says abc, caft abc and bcd
    assert (rows["exact_3_letters"]["ntp"], rows["exact_3_letters"]["caft"]) == (pytest.approx(1 / 4),
                                                                                 pytest.approx(2 / 4))
    # distinct answers: ntp ab, x, abc (3 of 48); caft ab, cd, abc, bcd, x (5 of 48)
    assert (rows["distinct"]["ntp"], rows["distinct"]["caft"]) == (pytest.approx(3 / 48), pytest.approx(5 / 48))
    assert [rows[name]["percent"] for name in rows] == [True, False, True, True]
    report = (compare_dir / REPORT_FILE).read_text()
    assert "| exact | 25.0% | 50.0% | +25.0 pp |" in report
    assert "- **length**: letters of the word. Unit: letters." in report


def test_a_task_name_is_taken_once():
    with pytest.raises(ValueError, match="a task named 'molecules' is already registered"):
        register_task(get_task("molecules"))
    with pytest.raises(ValueError, match="unknown task 'nope'; expected one of molecules, humaneval, math"):
        get_task("nope")
