"""Hostile and careless inputs, as a new user gives them, through the command line on tiny models.

Every case must end with a non-zero exit status and exactly one `caft: error:` line naming the path at fault, no
traceback, and every file outside the command's own output byte for byte as it was."""

import hashlib
import json
from pathlib import Path

import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model, its heads, heads of another base, and a valid task file, shared by the cases (read only)."""
    from caftkit.core.heads import attach_heads, get_heads, save_heads

    root = tmp_path_factory.mktemp("bad-inputs")
    saved_model_dir(root / "model", tiny_model("llama"))
    save_heads(get_heads(attach_heads(tiny_model("llama"), 2)), root / "heads")
    save_heads(get_heads(attach_heads(tiny_model("llama", seed=1), 2)), root / "other-heads")
    conversation = {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]}
    (root / "task.jsonl").write_text("".join(json.dumps(conversation) + "\n" for _ in range(8)))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Path -> SHA-256 of every file under `root` (folders as entries too, so that a new empty one shows)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def refused(argv: list[str], tmp_path: Path, capsys, names: str, output: Path | None = None) -> str:
    """Run `caft argv`; assert it fails with one `caft: error:` line naming `names`, no traceback, and nothing
    under `tmp_path` changed but `output` (which may appear). Returns the error line."""
    before = snapshot(tmp_path)
    status = main(argv)
    captured = capsys.readouterr()
    after = snapshot(tmp_path)
    if output is not None:
        own = str(output.relative_to(tmp_path))
        after = {key: value for key, value in after.items() if key != own and not key.startswith(own + "/")}
        before = {key: value for key, value in before.items() if key != own and not key.startswith(own + "/")}
    lines = captured.err.splitlines()
    assert status != 0
    assert [line for line in lines if line.startswith("caft: error:")] == lines[-1:], captured.err
    assert len([line for line in lines if "error" in line.lower()]) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert names in lines[-1], lines[-1]
    assert after == before
    return lines[-1]


# --- outputs that are not the command's own ---------------------------------------------------------------------

def test_distill_into_a_users_text_file_without_a_final_newline(workspace, tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_bytes(b"my notes, no newline at the end")
    refused(["distill", "--model", str(workspace / "model"), "--data", str(workspace / "task.jsonl"),
             "--output", str(mine)], tmp_path, capsys, f"{mine}: exists and was not written by caft distill")


def test_distill_into_a_users_jsonl_whose_records_have_ids(workspace, tmp_path, capsys):
    mine = tmp_path / "train.jsonl"
    mine.write_text('{"id": "a", "messages": []}\n')
    refused(["distill", "--model", str(workspace / "model"), "--data", str(workspace / "task.jsonl"),
             "--output", str(mine)], tmp_path, capsys, f"{mine}: exists and was not written by caft distill")


def folder_command(workspace: Path, command: str) -> list[str]:
    """`caft <command>` on the workspace's model and data, all but its --output (a folder)."""
    task = ["--task", "loss"] if command == "eval" else []
    heads = ["--heads", str(workspace / "heads")] if command in ("finetune", "compare") else []  # caft mode's
    return [command, "--model", str(workspace / "model"), *task, *heads, "--data", str(workspace / "task.jsonl")]


@pytest.mark.parametrize("command", ["finetune", "train-heads", "eval", "compare"])
def test_an_output_folder_that_is_a_users_file(workspace, tmp_path, capsys, command):
    mine = tmp_path / "results"
    mine.write_text("a user's file")
    refused([*folder_command(workspace, command), "--output", str(mine)], tmp_path, capsys,
            f"{mine}: exists and is not a folder; caft {command} writes a folder there")


@pytest.mark.parametrize("command", ["finetune", "train-heads", "eval", "compare"])
def test_an_output_folder_holding_a_users_files(workspace, tmp_path, capsys, command):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my project")
    refused([*folder_command(workspace, command), "--output", str(mine)], tmp_path, capsys,
            f"{mine}: a folder caft {command} did not make")


# Folders that merely look like caft's: each holds names the command writes, but no marker of its own.
@pytest.mark.parametrize("command, contents, flags", [
    ("train-heads", {"checkpoints/my-model.pt": b"weights"}, []),
    ("finetune", {"checkpoint-best/weights.pt": b"weights", "final/thesis.txt": b"chapter 1"}, []),
    ("finetune", {"checkpoint-1-backup/a.pt": b"one", "checkpoint-2-backup/b.pt": b"two"},
     ["--save-steps", "1", "--save-total-limit", "1"]),
    ("eval", {"generations.jsonl": b'{"id": 0, "answer": "x"}\n{"id": 1, "answer": "no newline"}'}, []),
    ("compare", {"seed-1/notes.txt": b"mine", "report.md": b"# my report", "comparison.json": b"{}"}, []),
])
def test_a_folder_holding_names_caft_writes_is_not_caft_s(workspace, tmp_path, capsys, command, contents, flags):
    mine = tmp_path / "mine"
    for name, data in contents.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_bytes(data)
    refused([*folder_command(workspace, command), *flags, "--output", str(mine)], tmp_path, capsys,
            f"{mine}: a folder caft {command} did not make")


def test_a_second_run_on_a_symlink_to_the_output_of_the_first(workspace, tmp_path, capsys):
    from caftkit.files.outputs import output_lock

    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with output_lock(tmp_path / "real"):
        refused([*folder_command(workspace, "finetune"), "--output", str(tmp_path / "alias")], tmp_path, capsys,
                f"{tmp_path / 'alias'}: another caft run is writing this output", output=tmp_path / ".real.caft-lock")


@pytest.fixture(scope="module")
def finished_run(workspace):
    """A one-step CAFT run of the workspace's model, with its heads (module-wide, read only)."""
    run = workspace / "run"
    assert main(["finetune", "--model", str(workspace / "model"), "--heads", str(workspace / "heads"), "--data",
                 str(workspace / "task.jsonl"), "--max-steps", "1", "--batch-size", "2", "--head-warmup", "no",
                 "--output", str(run)]) == 0
    return run


@pytest.mark.parametrize("where", ["users-folder", "working-directory", "runs-own-heads", "a-file"])
def test_export_never_replaces_what_it_did_not_write(finished_run, tmp_path, capsys, monkeypatch, where):
    run = copy_tree(finished_run, tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("a user's file")
    monkeypatch.chdir(tmp_path)
    flags, named = {"users-folder": (["--output", "model", "--heads-output", str(mine)], mine),
                    "working-directory": (["--output", "model", "--heads-output", "."], "."),
                    "runs-own-heads": (["--output", "model", "--heads-output", str(run / "heads")], run / "heads"),
                    "a-file": (["--output", str(tmp_path / "file.txt")], tmp_path / "file.txt")}[where]
    refused(["export", str(run), *flags], tmp_path, capsys, f"{named}: exists and was not written by caft export")


def test_export_into_a_users_folder_holding_the_marker_of_an_export(finished_run, tmp_path, capsys):
    """A copied `caft_export.json` and `.caft-output` make nothing of the user's folder caft's; an export that the
    user added a file to is not replaced either."""
    run = copy_tree(finished_run, tmp_path / "run")
    assert main(["export", str(run), "--output", str(tmp_path / "model")]) == 0
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"the user's weights")
    for name in ("caft_export.json", ".caft-output"):
        (mine / name).write_bytes((tmp_path / "model" / name).read_bytes())
    refused(["export", str(run), "--output", str(mine), "--heads-output", str(tmp_path / "h")], tmp_path, capsys,
            f"{mine}: exists and was not written by caft export")
    (tmp_path / "model" / "notes.md").write_text("my notes on this model")
    refused(["export", str(run), "--output", str(tmp_path / "model")], tmp_path, capsys,
            f"{tmp_path / 'model'}: holds notes.md, which caft export did not write")


def test_export_with_the_heads_into_the_model_folder(finished_run, tmp_path, capsys):
    run = copy_tree(finished_run, tmp_path / "run")
    refused(["export", str(run), "--output", str(tmp_path / "x"), "--heads-output", str(tmp_path / "." / "x")],
            tmp_path, capsys, f"{tmp_path / 'x'}: --heads-output is the folder of --output; give each its own folder")


@pytest.mark.parametrize("damage", ["caft_run.json", "final/adapter_config.json"])
def test_export_of_a_run_with_a_broken_json_file(finished_run, tmp_path, capsys, damage):
    """The run's record and its LoRA adapter's config are named with their line when broken (PEFT's own error
    named neither)."""
    run = copy_tree(finished_run, tmp_path / "run")
    data = (run / damage).read_bytes()
    (run / damage).write_bytes(data[: len(data) // 2])
    error = refused(["export", str(run), "--output", str(tmp_path / "model")], tmp_path, capsys, f"{run / damage}")
    assert ": not valid JSON (" in error and " at line " in error, error


@pytest.mark.parametrize("command", ["train-heads", "finetune"])
def test_sequences_longer_than_the_models_positions(workspace, tmp_path, capsys, command):
    """gpt2's learned positions (256 in the tiny one) would fail with an IndexError in the first long batch."""
    model = saved_model_dir(tmp_path / "gpt2", tiny_model("gpt2"))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a " * 200},
                                             {"role": "assistant", "content": "b " * 200}]}) + "\n")
    mode = ["--mode", "ntp"] if command == "finetune" else []
    error = refused([command, *mode, "--model", str(model), "--data", str(data), "--max-length", "1000", "--output",
                     str(tmp_path / "out")], tmp_path, capsys, f"{data}: sequences of up to ")
    assert error.endswith("takes 256 positions: set --max-length 256 or lower"), error


@pytest.mark.parametrize("flags, message", [
    (["--output", "same.json", "--plot", "same.json"], "same.json: --plot writes a PNG file"),
    (["--output", "same.png", "--plot", "same.png"], "same.png: --plot and --output are one file"),
    (["--plot", "x.txt"], "x.txt: --plot writes a PNG file: name it .png"),
    (["--output", "nodir/x.json"], "nodir: no such folder for --output"),
])
def test_bench_train_sweep_outputs_are_checked_before_measuring(workspace, tmp_path, capsys, monkeypatch, flags,
                                                                message):
    monkeypatch.chdir(tmp_path)
    refused(["bench", "train", "--model", str(workspace / "model"), "--sweep", *flags], tmp_path, capsys, message)


def test_bench_train_longer_than_the_models_positions(tmp_path, capsys):
    model = saved_model_dir(tmp_path / "gpt2", tiny_model("gpt2"))
    refused(["bench", "train", "--model", str(model), "--seq-len", "300"], tmp_path, capsys,
            f"--seq-len: sequences of up to 300 tokens, but {model} takes 256 positions: set --seq-len 256 or lower")


def test_distill_of_a_blank_prompts_file_writes_nothing(workspace, tmp_path, capsys):
    blank = tmp_path / "prompts.jsonl"
    blank.write_text("\n\n")
    refused(["distill", "--model", str(workspace / "model"), "--data", str(blank), "--output",
             str(tmp_path / "answers.jsonl")], tmp_path, capsys, f"{blank}: no prompt to answer (0 records read")


def test_molecule_records_from_no_valid_smiles_write_nothing(tmp_path, capsys):
    smiles = tmp_path / "smiles.txt"
    smiles.write_text("not-a-molecule\nC1CC\n")
    error = refused(["data", "molecules", "--smiles", str(smiles), "--output", str(tmp_path / "records.jsonl")],
                    tmp_path, capsys, f"{smiles}: no usable molecule (2 read; skipped: 2 invalid SMILES)")
    assert not (tmp_path / "records.jsonl").exists(), error


def test_train_heads_over_finished_heads(workspace, tmp_path, capsys):
    heads = copy_tree(workspace / "heads", tmp_path / "heads")
    refused(["train-heads", "--model", str(workspace / "model"), "--data", str(workspace / "task.jsonl"),
             "--output", str(heads)], tmp_path, capsys, f"{heads}: a folder caft train-heads did not make")


def test_a_bench_result_over_an_existing_file(workspace, tmp_path, capsys):
    mine = tmp_path / "result.json"
    mine.write_text("{}")
    refused(["bench", "precision", "--data", str(workspace / "task.jsonl"), "--output", str(mine)], tmp_path, capsys,
            f"{mine}: already exists; --output must be a new file")


def test_an_output_another_run_is_writing(workspace, tmp_path, capsys):
    from caftkit.files.outputs import output_lock

    run = tmp_path / "run"
    with output_lock(run):
        refused(["finetune", "--mode", "ntp",
                 "--model", str(workspace / "model"), "--data", str(workspace / "task.jsonl"),
                 "--output", str(run)], tmp_path, capsys, f"{run}: another caft run is writing this output",
                output=tmp_path / ".run.caft-lock")


# --- models, weights, heads and configs that are missing or broken --------------------------------------------

def test_a_model_folder_that_does_not_exist(workspace, tmp_path, capsys):
    refused(["finetune", "--mode", "ntp",
             "--model", str(tmp_path / "nonexistent"), "--data", str(workspace / "task.jsonl"),
             "--output", str(tmp_path / "run")], tmp_path, capsys, f"{tmp_path / 'nonexistent'}")


def test_a_hub_id_not_in_the_cache(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    refused(["finetune", "--mode", "ntp",
             "--model", "someone/not-cached-model", "--data", str(workspace / "task.jsonl"),
             "--output", str(tmp_path / "run")], tmp_path, capsys, "someone/not-cached-model")


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                    "generation_config.json"])
def test_a_model_folder_with_a_broken_file(workspace, tmp_path, capsys, damage):
    """A broken JSON file is named with its line (transformers would name the folder at best, and would pass over
    a broken generation_config.json); broken weights name the folder."""
    model = copy_tree(workspace / "model", tmp_path / "model")
    data = (model / damage).read_bytes()
    (model / damage).write_bytes(data[: len(data) // 2])  # cut off, as by a full disk or an interrupted copy
    error = refused(["finetune", "--model", str(model), "--data", str(workspace / "task.jsonl"), "--mode", "ntp",
                     "--output", str(tmp_path / "run")], tmp_path, capsys, f"{model}")
    if damage.endswith(".json"):
        assert f"{model / damage}: not valid JSON (" in error and " at line " in error, error


@pytest.mark.parametrize("damage", ["heads.safetensors", "heads_config.json"])
def test_a_heads_folder_with_a_broken_file(workspace, tmp_path, capsys, damage):
    heads = copy_tree(workspace / "heads", tmp_path / "heads")
    data = (heads / damage).read_bytes()
    (heads / damage).write_bytes(data[: len(data) // 2])
    refused(["finetune", "--model", str(workspace / "model"), "--heads", str(heads), "--data",
             str(workspace / "task.jsonl"), "--output", str(tmp_path / "run")], tmp_path, capsys,
            f"{heads / damage}")


@pytest.mark.parametrize("fingerprint", [{}, None])
def test_heads_whose_fingerprint_is_empty_or_null(workspace, tmp_path, capsys, fingerprint):
    heads = copy_tree(workspace / "heads", tmp_path / "heads")
    config = json.loads((heads / "heads_config.json").read_text())
    config["base_fingerprint"] = fingerprint
    (heads / "heads_config.json").write_text(json.dumps(config))
    refused(["finetune", "--model", str(workspace / "model"), "--heads", str(heads), "--data",
             str(workspace / "task.jsonl"), "--output", str(tmp_path / "run")], tmp_path, capsys,
            f"{heads / 'heads_config.json'}: field 'base_fingerprint' lacks")


def test_heads_of_another_base_model(workspace, tmp_path, capsys):
    other = saved_model_dir(tmp_path / "other-model", tiny_model("llama", seed=3))
    refused(["finetune", "--model", str(other), "--heads", str(workspace / "heads"), "--data",
             str(workspace / "task.jsonl"), "--output", str(tmp_path / "run")], tmp_path, capsys,
            f"{workspace / 'heads' / 'heads_config.json'}")


# --- data and config files ------------------------------------------------------------------------------------

def test_a_latin1_data_file(workspace, tmp_path, capsys):
    data = tmp_path / "task.jsonl"
    data.write_bytes(json.dumps({"messages": [{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": "y"}]}).encode() + b"\n"
                     + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    refused(["finetune", "--mode", "ntp",
             "--model", str(workspace / "model"), "--data", str(data), "--output",
             str(tmp_path / "run")], tmp_path, capsys, f"{data}:2: not UTF-8 text")


def test_a_latin1_config_file(workspace, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes("data: caf\u00e9.jsonl\n".encode("latin-1"))
    refused(["finetune", "--mode", "ntp", "--config", str(config), "--output", str(tmp_path / "run")], tmp_path, capsys,
            f"{config}:1: not UTF-8 text")


def test_deeply_nested_json_in_a_data_file(workspace, tmp_path, capsys):
    data = tmp_path / "task.jsonl"
    data.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    refused(["finetune", "--mode", "ntp",
             "--model", str(workspace / "model"), "--data", str(data), "--output",
             str(tmp_path / "run")], tmp_path, capsys, f"{data}:1: nested too deeply")


def test_deeply_nested_json_in_a_heads_config(workspace, tmp_path, capsys):
    heads = copy_tree(workspace / "heads", tmp_path / "heads")
    (heads / "heads_config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(["finetune", "--model", str(workspace / "model"), "--heads", str(heads), "--data",
             str(workspace / "task.jsonl"), "--output", str(tmp_path / "run")], tmp_path, capsys,
            f"{heads / 'heads_config.json'}: nested too deeply")


@pytest.mark.parametrize("line, what", [
    ("{not json", "2: not valid JSON"),
    ('{"messages": []}', "2: field 'messages'"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "2: "),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "2: "),
])
def test_records_that_are_not_conversations(workspace, tmp_path, capsys, line, what):
    data = tmp_path / "task.jsonl"
    data.write_text((workspace / "task.jsonl").read_text().splitlines()[0] + "\n" + line + "\n")
    refused(["finetune", "--mode", "ntp",
             "--model", str(workspace / "model"), "--data", str(data), "--output",
             str(tmp_path / "run")], tmp_path, capsys, f"{data}:{what}")


def test_a_data_file_that_does_not_exist(workspace, tmp_path, capsys):
    refused(["finetune", "--mode", "ntp",
             "--model", str(workspace / "model"), "--data", str(tmp_path / "missing.jsonl"),
             "--output", str(tmp_path / "run")], tmp_path, capsys, f"{tmp_path / 'missing.jsonl'}: data file not found")
