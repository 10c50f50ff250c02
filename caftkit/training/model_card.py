"""Model cards of what caftkit trains: the exported model's README.md and the run folder's, as
`huggingface_hub.ModelCard`s whose metadata the Hub reads.

The metadata names a base model or a dataset only by its Hub id (a local folder or file is named in the text);
the licence is the base's where its card or caftkit knows it.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from ..evaluation.evaluation_record import TaskEvaluation
from ..models import BUNDLED_MODEL, BUNDLED_MODEL_HUB_ID, BUNDLED_MODEL_LICENSE, BUNDLED_MODEL_ORIGIN, cache_dir
from .card_evaluations import eval_results, evaluation_lines

# The method's paper: what the cards cite and what TRL's card hooks read (title, arXiv id, BibTeX).
CAFT_PAPER = {
    "title": "Improving Large Language Models with Concept-Aware Fine-Tuning",
    "id": "2506.07833",
    "citation": """@article{chen2025caft,
  title   = {Improving Large Language Models with Concept-Aware Fine-Tuning},
  author  = {Chen, Michael K. and Zhang, Xikun and Huang, Jiaxing and Tao, Dacheng},
  journal = {arXiv preprint arXiv:2506.07833},
  year    = {2025},
  url     = {https://arxiv.org/abs/2506.07833}
}""",
}
CARD_FILE = "README.md"
# The packages whose versions a card records.
FRAMEWORKS = ("caftkit", "torch", "transformers", "trl", "peft", "accelerate", "datasets")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub id (`owner/name`, not a local path), else None."""
    if not name or not _HUB_ID.fullmatch(name) or Path(name).exists():
        return None
    return name


def _is_bundled(name: str) -> bool:
    # By its name, or by the folder caftkit converted it into (what a loaded model's config records).
    return name == BUNDLED_MODEL or Path(name) == cache_dir() / "models" / BUNDLED_MODEL


def base_model_id(name: str | None) -> str | None:
    """The Hub id a card's `base_model` names: the base's own, or for the bundled model the Hub model it was made
    from; None for a local folder."""
    if name and _is_bundled(name):
        return BUNDLED_MODEL_HUB_ID
    return hub_id(name)


def describe_base(name: str) -> str:
    """The base model as a card's text names it: the bundled model with its provenance, a Hub id, or a folder."""
    if _is_bundled(name):
        return f"the bundled `{BUNDLED_MODEL}`: {BUNDLED_MODEL_ORIGIN}"
    if hub_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    return f"the local model `{name}`"


def base_license(name: str) -> str | None:
    """The base model's licence: caftkit's record for the bundled model, else the `license` of the base's own card
    (a local folder's README.md, or a Hub model's in the local cache; nothing is downloaded), else None."""
    if _is_bundled(name):
        return BUNDLED_MODEL_LICENSE
    card_path: Any = Path(name) / CARD_FILE if Path(name).is_dir() else None
    if card_path is None and hub_id(name):
        card_path = try_to_load_from_cache(name, CARD_FILE)
    if not isinstance(card_path, (str, Path)) or not Path(card_path).is_file():
        return None
    try:
        return ModelCard.load(card_path).data.license
    except Exception:  # a card the Hub's parser rejects gives no licence, not a failed export
        return None


def framework_versions() -> dict[str, str]:
    """The installed version of each of `FRAMEWORKS` (those installed)."""
    versions = {}
    for package in FRAMEWORKS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _card(data, body: str):
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def _tags(mode: str, method: str | None) -> list[str]:
    tags = ["caftkit", "concept-aware-fine-tuning"]
    if mode == "caft":
        tags.append("multi-token-prediction")
    return tags + ([method] if method == "lora" else [])


def _citation() -> str:
    return f"## Citation\n\nCAFT, the method:\n\n```bibtex\n{CAFT_PAPER['citation']}\n```\n"


def exported_model_card(run: dict[str, Any], model_dir: str | Path, heads_dir: str | Path | None,
                        evaluations: Sequence[TaskEvaluation] = ()):
    """The card of a model `caft export` wrote to `model_dir` from the finished run `run` (its `caft_run.json`),
    with its heads in `heads_dir` (None: the run had none) and the `caft eval` results of this model
    (`evaluations`, already checked to be of it): its `model-index` and an "Evaluation" section."""
    settings = run["settings"]
    base, data, mode, method = settings["model"], settings["data"], settings["mode"], settings["method"]
    mode_name = "CAFT" if mode == "caft" else "Next-token"
    base_name = hub_id(base) or Path(base).name
    title = f"{mode_name} fine-tune of {base_name} on {Path(data).name}"
    dataset = hub_id(data)
    card_data = ModelCardData(base_model=base_model_id(base), license=base_license(base), library_name="transformers",
                              pipeline_tag="text-generation", tags=_tags(mode, method), model_name=title,
                              datasets=[dataset] if dataset else None,
                              eval_results=eval_results(evaluations) or None)
    body = [f"# {title}", "",
            f"{mode_name} fine-tuning of {describe_base(base)}, on `{data}`, with caftkit"
            + (f" ([Concept-Aware Fine-Tuning](https://arxiv.org/abs/{CAFT_PAPER['id']}): the next-token loss plus "
               "the losses of auxiliary heads that predict tokens t+2, t+3, ..., with a small decaying weight)"
               if mode == "caft" else "")
            + ". This folder is a plain transformers checkpoint" + (" (LoRA merged into the weights)"
                                                                     if method == "lora" else "")
            + ": caftkit is not needed to load or serve it.", "",
            "## Usage", "", "Greedy decoding, as `caft eval` answered:", "", "```python",
            "from transformers import pipeline", "",
            f'generator = pipeline("text-generation", model="{model_dir}")',
            'messages = [{"role": "user", "content": "Your prompt here"}]',
            'print(generator(messages, max_new_tokens=128, do_sample=False)[0]["generated_text"][-1]["content"])',
            "```", ""]
    if heads_dir is not None:
        body += ["## The auxiliary heads", "", f"`{heads_dir}` holds the auxiliary heads the run used; "
                 + _heads_status(run, model_dir, heads_dir) + " Only caftkit reads them: to generate faster by "
                 "self-speculative decoding (the heads draft, the model verifies; the text is the one plain greedy "
                 "decoding gives), or to start another CAFT run. `caft export-heads --format eagle3` writes head 2 "
                 "as an EAGLE-3 draft that vLLM and SGLang load; otherwise serve this folder alone as any "
                 "transformers model.",
                 "", "```bash",
                 f'caft generate --model {model_dir} --heads {heads_dir} --speculative --prompt "Your prompt here"',
                 "```", "", "```python", "import caftkit",
                 "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'model = caftkit.attach_heads(AutoModelForCausalLM.from_pretrained("{model_dir}"), "{heads_dir}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{model_dir}")',
                 'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Your prompt here"}],',
                 '                                       add_generation_prompt=True, return_tensors="pt", '
                 'return_dict=True)',
                 "answer = caftkit.generate(model, **inputs, max_new_tokens=128)",
                 "print(tokenizer.decode(answer.sequences[0], skip_special_tokens=True))", "```", ""]
    body += ["## Training", "", *_training_lines(run), "", "## Held-out metrics", "",
             f"On the {run['held_out_examples']} held-out examples at the end of training: head 1 is the model's own "
             "next-token head, head k predicts the token k positions ahead.", "",
             "| head | predicts | loss | top-1 accuracy |", "|---|---|---|---|"]
    for name, metrics in run.get("held_out_per_head", {}).items():
        k = int(name.split("_")[1])
        body.append(f"| {k} | t+{k} | {metrics['loss']:.4f} | {metrics['accuracy']:.4f} |")
    if evaluations:
        body += ["", *evaluation_lines(evaluations)]
    body += ["", "## Limitations", "", *_limitations(run, evaluations), "", "## Framework versions", "",
             *(f"- {package}: {version}" for package, version in framework_versions().items()), "", _citation()]
    return _card(card_data, "\n".join(body))


def _heads_status(run: dict[str, Any], model_dir: str | Path, heads_dir: str | Path) -> str:
    """What the heads were fitted to, from the run's record: trained along, or frozen (after a warm-up or not)."""
    settings = run["settings"]
    if settings.get("train_heads"):
        return "they trained with this model during fine-tuning, so they predict for it."
    warmed = (run.get("head_warmup") or {}).get("warmed_up")
    return (f"they were {'warmed up on the task, then ' if warmed else ''}frozen during fine-tuning, so they predict "
            "for the model they were trained on, not for this one: drafts from them are accepted less. Re-fitted "
            f"to this model (`caft train-heads --model {model_dir} --data {settings['data']} --init {heads_dir} "
            "--epochs 1 --output <heads>`), they draft faster.")


def _limitations(run: dict[str, Any], evaluations: Sequence[TaskEvaluation]) -> list[str]:
    settings = run["settings"]
    lines = [f"- Fine-tuned on `{settings['data']}` alone; it keeps the base model's limits and biases.",
             "- The held-out metrics are losses on held-out examples of the fine-tuning data: how well the model "
             "fits that data, not how well it does the task. "
             + ("The task metrics under Evaluation hold for its greedy answers, within the new tokens shown, to "
                "those test examples; sampled answers, longer answers or other data may score otherwise."
                if evaluations else "`caft eval` scores it on a task, with intervals; `caft export --eval` writes "
                "them into this card.")]
    if settings["mode"] == "caft":
        lines.append("- This run does not say whether CAFT did better than next-token fine-tuning would have: "
                     "`caft compare` (or `caft compare-evals` on two evaluations) measures that.")
    return lines


def _launch_text(launch: dict[str, Any] | None) -> str:
    """`, 2 processes (FSDP)` for a run spread over processes; nothing for one process or an older record."""
    if not launch or launch["processes"] == 1:
        return ""
    return f", {launch['processes']} processes ({launch['distribution']})"


def _training_lines(run: dict[str, Any]) -> list[str]:
    s = run["settings"]
    # QLoRA: LoRA adapters over a base loaded in 4 bits
    method = f"QLoRA ({s.get('quant_type', 'nf4')} 4-bit base)" if s.get("load_in_4bit") else s["method"]
    precision = run.get("mixed_precision", s["mixed_precision"])  # what `auto` became; older runs recorded no
    lines = [f"- data: `{s['data']}`: {run['train_examples']} training and {run['held_out_examples']} held-out "
             f"examples (held out at random with seed {s['seed']})",
             f"- {method} fine-tuning, {s['epochs']} epoch(s), learning rate {s['learning_rate']} "
             f"({s['lr_scheduler']}), batch {s['batch_size']} x {s['grad_accum']} accumulation, "
             f"{run['optimizer_steps']} optimisation steps, seed {s['seed']}",
             f"- weights in {s['dtype']}, mixed precision `{precision}`, on `{run.get('device', '?')}`"
             + _launch_text(run.get("launch"))]
    if s["method"] == "lora":
        lines.append(f"- LoRA rank {s['lora_r']}, alpha {s['lora_alpha']}, dropout {s['lora_dropout']}")
    if s["mode"] == "caft":
        num_aux_heads = s.get("num_aux_heads", s.get("num_heads"))  # runs recorded before the rename say num_heads
        warmup = run.get("head_warmup") or {}
        lines.append(f"- CAFT: {num_aux_heads} auxiliary heads, alpha {s['alpha']}, beta {s['beta']}, schedule "
                     f"`{s['schedule']}`; heads `{s.get('heads')}`, warmed up on the task: "
                     f"{'yes' if warmup.get('warmed_up') else 'no'}")
    return lines


def run_folder_card(base: str | None, mode: str, method: str | None = None):
    """The card TRL's hooks write into a run folder while it trains: a caftkit run (CAFT or next-token) of
    `base`, and how to export it."""
    return _run_card(base, mode, method, adapter=False)


def adapter_card(base: str | None, mode: str):
    """The card of a LoRA adapter folder (`final/`, `checkpoint-N/`) in place of PEFT's blank template: what it
    adapts, how to load it, and how to export it merged."""
    return _run_card(base, mode, "lora", adapter=True)


def _run_card(base: str | None, mode: str, method: str | None, adapter: bool):
    mode_name = "CAFT" if mode == "caft" else "next-token"
    card_data = ModelCardData(base_model=base_model_id(base), library_name="peft" if adapter else "transformers",
                              pipeline_tag="text-generation", tags=["trl", *_tags(mode, method)])
    what = (f"The LoRA adapter of a {mode_name} fine-tuning" if adapter
            else f"Checkpoints and the final weights of a {mode_name} fine-tuning")
    body = [f"# A caftkit {mode_name} fine-tuning {'adapter' if adapter else 'run'}", "",
            f"{what} of {describe_base(base) if base else 'a model'}, trained with caftkit on TRL's SFTTrainer"
            + (f" ([Concept-Aware Fine-Tuning](https://arxiv.org/abs/{CAFT_PAPER['id']}))" if mode == "caft" else "")
            + ".", ""]
    if adapter:
        body += ["`peft.PeftModel.from_pretrained(base_model, <this folder>)` loads it onto the base model.", ""]
    body += [f"`caft export <{'the run folder above this one' if adapter else 'this folder'}> --output <model>` "
             "writes the fine-tuned model as a plain transformers checkpoint (LoRA merged, heads in "
             "`<model>-heads`), with its full model card.", "", _citation()]
    return _card(card_data, "\n".join(body))
