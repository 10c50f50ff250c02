"""Model cards: the exported model's and the run folder's parse with huggingface_hub, carry valid metadata (a base
model or dataset only by Hub id, the base's licence), the run's settings, metrics and versions, the citation, and
usage snippets that run as written."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import transformers
from huggingface_hub import ModelCard, ModelCardData
from test_finetune import settings_for, tiny_dir, write_task  # noqa: F401  (tiny_dir is a fixture)

from caftkit.models import BUNDLED_MODEL, cache_dir
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
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert CAFT_PAPER["citation"] in readme and f"https://arxiv.org/abs/{CAFT_PAPER['id']}" in readme
