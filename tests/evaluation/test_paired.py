"""A 95% interval for every metric `caft eval` reports, and `caft compare-evals`: the paired difference of two
evaluations with its interval, both equal to a bootstrap written out naively."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.cli import main
from caftkit.evaluation.bootstrap import draw_resamples
from caftkit.evaluation.settings import EvalSettings
from caftkit.evaluation.task_eval import GENERATIONS_FILE, METRICS_FILE, evaluate
from caftkit.tasks.molecules import describe_molecule, molecule_record
from caftkit.tasks.registry import get_task

HELD_OUT = ["CCO", "Oc1ccccc1", "CC#N", "CCN", "CC(=O)O", "c1ccncc1"]
BASELINE = ["CCO", "hello", "CC#N", "CCO", "nope", "CCO"]  # valid: 4 of 6, distinct valid: CCO, CC#N
OTHER = ["CCO", "Oc1ccccc1", "CC#N", "CCN", "nope", "CCO"]  # valid: 5 of 6, four distinct


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    """Two molecule evaluations of the same held-out molecules, from given answers (nothing generated)."""
    root = tmp_path_factory.mktemp("paired")
    held_out = root / "held-out.jsonl"
    held_out.write_text("".join(json.dumps(molecule_record(describe_molecule(s))) + "\n" for s in HELD_OUT))
    model = saved_model_dir(root / "model", tiny_model("llama"))
    ids = [example.id for example in get_task("molecules").examples(str(held_out), None, 0)]
    folders = {}
    for name, answers in (("baseline", BASELINE), ("other", OTHER)):
        folder = root / name
        folder.mkdir()
        (folder / GENERATIONS_FILE).write_text("".join(json.dumps({"id": i, "output": a}) + "\n"
                                                       for i, a in zip(ids, answers)))
        evaluate(folder, EvalSettings(model=str(model), task="molecules", data=str(held_out), max_new_tokens=8,
                                      device="cpu"), progress=False)
        folders[name] = folder
    return root, folders


def naive_quantiles(values: list[np.ndarray]) -> list[float]:
    return list(np.quantile(np.array(values), [0.025, 0.975]))


def test_every_metric_gets_a_bootstrap_interval_over_the_examples(evaluations):
    _, folders = evaluations
    recorded = json.loads((folders["other"] / METRICS_FILE).read_text())
    intervals = {interval["metric"]: interval for interval in recorded["intervals"]}
    assert list(intervals) == ["validity", "formula_match", "group_recall", "groups_match", "exact_match",
                               "tanimoto", "uniqueness"]
    draws = draw_resamples(6, 1, 2000, 0).examples
    valid = np.array([1, 1, 1, 1, 0, 1], dtype=float)
    validity = intervals["validity"]
    assert (validity["value"], validity["n_examples"], validity["n_resamples"]) == (5 / 6, 6, 2000)
    assert [validity["low"], validity["high"]] == pytest.approx(naive_quantiles([valid[row].mean() for row in draws]))
    # uniqueness is recomputed on each resample: distinct valid answers / valid answers, a drawn repeat carrying
    # its own share (CCO is answered twice)
    answers = np.array(OTHER)
    share = {answer: int(((answers == answer) & (valid == 1)).sum()) for answer in OTHER}
    weights = np.array([1 / share[a] if v else 0.0 for a, v in zip(OTHER, valid)])
    uniqueness = intervals["uniqueness"]
    assert uniqueness["value"] == pytest.approx(4 / 5)
    assert [uniqueness["low"], uniqueness["high"]] == pytest.approx(
        naive_quantiles([weights[row].sum() / valid[row].sum() for row in draws if valid[row].sum()]))
    assert recorded["metrics"]["validity"] == validity["value"]


def test_compare_evals_gives_the_paired_difference_and_its_interval(evaluations, capsys):
    _, folders = evaluations
    assert main(["compare-evals", str(folders["baseline"]), str(folders["other"]), "--n-resamples", "500"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"{folders['other']} against {folders['baseline']}: 6 test examples, 95% intervals from "
                          "500 paired resamples")
    draws = draw_resamples(6, 1, 500, 0).examples
    base_valid, other_valid = np.array([1, 0, 1, 1, 0, 1.0]), np.array([1, 1, 1, 1, 0, 1.0])
    low, high = naive_quantiles([other_valid[row].mean() - base_valid[row].mean() for row in draws])
    validity = next(line for line in printed if line.split()[0] == "validity")
    assert validity.split()[1:4] == ["66.7%", "83.3%", "+16.7"]
    assert f"[{100 * low:+.1f} pp, {100 * high:+.1f} pp]".replace("+0.0", "0.0") in validity


def test_the_help_states_the_interval(capsys):
    """A "95%" in a command's summary or a setting's help is text, not an argparse format."""
    assert main(["compare-evals", "--help"]) == 0
    assert "95% interval" in " ".join(capsys.readouterr().out.split())


def test_compare_evals_refuses_evaluations_it_cannot_pair(evaluations, capsys):
    root, folders = evaluations
    fewer = root / "fewer"
    fewer.mkdir()
    for name in (METRICS_FILE, "examples.jsonl"):
        lines = (folders["other"] / name).read_text().splitlines(keepends=True)
        (fewer / name).write_text("".join(lines[:-1]) if name != METRICS_FILE else "".join(lines))
    assert main(["compare-evals", str(folders["baseline"]), str(fewer)]) == 2
    assert capsys.readouterr().err == (f"caft: error: {fewer}: scored on other test examples than "
                                       f"{folders['baseline']} (the ids of examples.jsonl differ): evaluate both on "
                                       "the same --data and --max-examples\n")
    loss = root / "loss"
    loss.mkdir()
    (loss / METRICS_FILE).write_text(json.dumps({"task": "loss", "metrics": {}}))
    assert main(["compare-evals", str(folders["baseline"]), str(loss)]) == 2
    assert capsys.readouterr().err.startswith(f"caft: error: {loss / METRICS_FILE}: field 'task': 'loss' has no "
                                              "per-example metrics to compare")
