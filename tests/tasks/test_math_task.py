"""The math task: records from reasoning-gym (train and test disjoint), the final number of an answer, exact match
overall and by digit count, and `caft eval --task math` end to end."""

from __future__ import annotations

import json

import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.cli import main
from caftkit.data import DataError
from caftkit.evaluation.settings import EvalSettings
from caftkit.evaluation.task_eval import GENERATIONS_FILE, evaluate
from caftkit.tasks.math_problems import (
    MIN_GROUP_EXAMPLES,
    digit_count,
    final_number,
    normalize_number,
    write_math_records,
)
from caftkit.tasks.registry import get_task
from caftkit.tasks.settings import MathDataSettings


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("text, number", [("288", "288"), ("-61", "-61"), ("1,234", "1234"), ("12.50", "12.5"),
                                          ("7.0", "7"), ("-0", "0"), ("0.25", "0.25"), ("abc", None), ("", None)])
def test_numbers_are_normalised(text, number):
    assert normalize_number(text) == number


@pytest.mark.parametrize("answer, number", [
    ("The answer is 15.", "15"),
    ("-224", "-224"),
    ("3 + 4 = 7", "7"),
    ("so 35 x 3 = 105 kiwi\n#### 288", "288"),
    ("#### 1,200 apples, not 5", "5"),        # after the mark: the last number there
    ("It costs $1,234.00 in all.", "1234"),
    ("I cannot tell.", None),
    ("#### none", None),
])
def test_the_final_number_of_an_answer(answer, number):
    assert final_number(answer) == number


def test_digit_count_ignores_sign_and_decimals():
    assert [digit_count(n) for n in ("0", "-61", "578", "-1000", "0.5", "12.75")] == [1, 2, 3, 4, 1, 2]


def test_train_and_test_sets_are_disjoint_and_reproducible(tmp_path):
    shape = dict(family="chain_sum", min_digits=2, max_digits=3, max_terms=2)
    test_stats = write_math_records(tmp_path / "test.jsonl", n=60, seed=0, **shape)
    # seed 10 draws problem i from Random(10 + i): its first 50 are the test set's problems 10..59
    stats = write_math_records(tmp_path / "train.jsonl", n=60, seed=10, exclude=[str(tmp_path / "test.jsonl")],
                               **shape)
    test, train = read_jsonl(tmp_path / "test.jsonl"), read_jsonl(tmp_path / "train.jsonl")
    questions = {record["messages"][0]["content"] for record in test}
    assert len(test) == len(train) == 60 and len(questions) == 60
    assert not questions & {record["messages"][0]["content"] for record in train}
    assert stats["skipped"]["in an --exclude file"] >= 50
    assert stats["read"] == 60 + sum(stats["skipped"].values()) and test_stats["written"] == 60
    for record in train:
        question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        terms = question.rsplit(":", 1)[1].rstrip(" =")
        assert answer == record["meta"]["answer"] == str(eval(terms))  # the expression's own value
        assert record["meta"]["digits"] == len(answer.lstrip("-")) and record["meta"]["family"] == "chain_sum"
    # the same settings give the same file, byte for byte
    write_math_records(tmp_path / "again.jsonl", n=60, seed=0, **shape)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "test.jsonl").read_bytes()


def test_gsm_symbolic_records_answer_with_a_worked_solution(tmp_path):
    write_math_records(tmp_path / "gsm.jsonl", family="gsm_symbolic", n=5, seed=3)
    for record in read_jsonl(tmp_path / "gsm.jsonl"):
        solution = record["messages"][1]["content"]
        assert solution.rstrip().endswith(f"#### {record['meta']['answer']}")
        assert final_number(solution) == record["meta"]["answer"]


def test_data_math_refuses_what_it_cannot_build(tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    for flags, message in [
        (["--min-digits", "3", "--max-digits", "2"], "min_digits 3 is above max_digits 2"),
        (["--family", "algebra"], "argument --family: 'algebra' is not one of gsm_symbolic, chain_sum, products"),
        (["--exclude", str(tmp_path / "missing.jsonl")], "missing.jsonl: --exclude file not found"),
        (["--max-digits", "1", "--n", "500"], "chain_sum: only 200 distinct problems in"),
    ]:
        assert main(["data", "math", "--output", out, *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written is left
    (tmp_path / "out.jsonl").write_text("mine\n")
    with pytest.raises(ValueError, match="out.jsonl: exists"):
        MathDataSettings(output=out)
    assert (tmp_path / "out.jsonl").read_text() == "mine\n"


def write_problems(path, answers: list[str]):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i}?"},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for i, a in enumerate(answers)))
    return path


def test_scoring_counts_exact_matches_overall_and_by_digit_count(tmp_path):
    task = get_task("math")
    data = write_problems(tmp_path / "test.jsonl", ["7", "-12", "345", "1,000", "So it is 58.\n#### 58", "40"])
    examples = task.examples(str(data), None, 0)
    assert [e.reference for e in examples] == [{"answer": "7", "digits": 1}, {"answer": "-12", "digits": 2},
                                               {"answer": "345", "digits": 3}, {"answer": "1000", "digits": 4},
                                               {"answer": "58", "digits": 2}, {"answer": "40", "digits": 2}]
    answers = dict(zip([e.id for e in examples], ["7", "The answer is -12.", "354", "1000.0", "#### 58", "none"]))
    metrics, rows = task.score(examples, answers)
    assert metrics == {"n": 6, "exact_match": 4 / 6, "answered": 5 / 6,
                       "n_1_digits": 1, "exact_match_1_digits": 1.0, "n_2_digits": 3, "exact_match_2_digits": 2 / 3,
                       "n_3_digits": 1, "exact_match_3_digits": 0.0, "n_4_digits": 1, "exact_match_4_digits": 1.0}
    assert [row["predicted"] for row in rows] == ["7", "-12", "354", "1000", "58", None]
    # a comparison breaks exact match down only by digit counts with enough problems to say something
    many = [{"digits": 2}] * MIN_GROUP_EXAMPLES + [{"digits": 3}] * (MIN_GROUP_EXAMPLES - 1)
    assert [m.name for m in task.report_metrics(many)] == ["exact_match", "answered", "exact_match_2_digits"]
    assert task.report_metrics(many)[2].within == ("digits", 2)


def test_examples_name_the_record_without_a_number(tmp_path):
    data = write_problems(tmp_path / "test.jsonl", ["12", "no idea"])
    with pytest.raises(DataError, match=r"test.jsonl:2: field 'messages': no reference number in 'no idea'"):
        get_task("math").examples(str(data), None, 0)
    with pytest.raises(ValueError, match="--task math needs --data"):
        get_task("math").examples(None, None, 0)


def test_eval_task_math_scores_the_answers_and_a_rerun_gives_the_same_metrics(tmp_path):
    model = saved_model_dir(tmp_path / "model", tiny_model("llama"))
    data = write_problems(tmp_path / "test.jsonl", ["12", "-3", "450"])
    ids = [e.id for e in get_task("math").examples(str(data), None, 0)]
    output = tmp_path / "eval"
    output.mkdir()
    (output / GENERATIONS_FILE).write_text("".join(json.dumps({"id": i, "output": a}) + "\n"
                                                   for i, a in zip(ids, ["12", "3", "It is 450."])))
    settings = EvalSettings(model=str(model), task="math", data=str(data))
    assert settings.max_new_tokens == 256  # the task's own default
    result = evaluate(output, settings, progress=False)
    assert result["metrics"]["exact_match"] == pytest.approx(2 / 3)
    first = (output / "metrics.json").read_bytes()
    evaluate(output, settings, progress=False)
    assert (output / "metrics.json").read_bytes() == first
