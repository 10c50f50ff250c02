"""The `caft` commands of the training wing: distill, train-heads, finetune, export, export-heads.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when a command runs, not with this module: the command line reads and checks the settings first, without
torch, so that a bad setting is refused at once.
"""

from __future__ import annotations

from .settings import (
    DistillOutput,
    DistillSettings,
    ExportHeadsSettings,
    ExportSettings,
    FinetuneSettings,
    HeadsOutput,
    HeadTrainingSettings,
    RunOutput,
)


def distill_command(settings: DistillSettings, where: DistillOutput) -> dict:
    """Generate the base model's own answers to a set of prompts (self-distillation) as `messages` JSONL.

    Each prompt is the first user turn of a conversation, rendered with the model's chat template; each output
    line holds the source id, the prompt and answer as `messages`, why generation stopped (`end_of_turn` or
    `max_new_tokens`) and the number of new tokens. Rerunning the same command resumes: ids already written are
    skipped and a half-written last line is redone. Settings and counts are kept in `<output stem>.meta.json`.

    With `--server URL` an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp) generates the answers, many
    requests in flight, each written as it arrives; the server's tokenizer is checked against --model's before any
    prompt is sent, and a server that fails midway leaves a file that the same command completes.
    """
    from ..data import skipped_text
    from ..files.outputs import output_lock
    from ..models import load_model, load_tokenizer
    from .distill import check_distill_output, distill

    check_distill_output(where.output)  # before the tokenizer loads: a path that is not ours fails at once
    with output_lock(where.output):
        tokenizer = load_tokenizer(settings.model, settings.chat_template)
        model = None if settings.server else lambda: load_model(settings.model, settings.dtype).to(settings.device)
        summary = distill(model, tokenizer, where.output, settings)
    skipped = skipped_text(summary.skipped)
    tail = " (the file ends mid-record: its complete records were read)" if summary.source_truncated_tail else ""
    print(f"read {summary.records_read} records{tail}; skipped: {skipped}")
    print(f"{summary.prompts_selected} prompts selected, {summary.already_done} already in {where.output}, "
          f"{summary.generated} generated; stop reasons: {summary.stop_reasons or 'none'}")
    if summary.server:
        print(f"answered by {summary.server['model']!r} at {summary.server['url']} (prompts sent as "
              f"{summary.server['prompt_as']}, tokenizer checked by {summary.server['tokenizer_check']}); "
              f"{summary.retried_requests} requests tried again")
    print(f"{summary.new_tokens} new tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s); "
          f"{summary.written_total} records in {where.output}")
    return summary.__dict__


def train_heads_command(settings: HeadTrainingSettings, where: HeadsOutput) -> dict:
    """Train the auxiliary heads (paper eq. 3) with the base model frozen, and write a `heads/` folder.

    Each head is a copy of the last decoder layer that learns to predict token t+k (k = 2..num_aux_heads+1) through
    the model's own final norm and unembedding; the loss is sum_k alpha^(k-2) CE_k over the assistant tokens.
    Train once per base model on self-distilled data (`caft distill`); for a task whose tokens the heads
    predict badly (auxiliary loss L2 > 4), warm them up with one epoch on the task's training set:
    `caft train-heads --data task.jsonl --init heads/ --output task-heads/`. The folder gets `heads.safetensors`,
    `heads_config.json` (settings, and each head's held-out loss and top-1 accuracy before and after),
    `log_history.json` and `loss_curves.png`.
    """
    from ..core.distributed import is_main_process
    from .head_training import format_head_table, train_heads

    summary = train_heads(where.output, settings, resume=where.resume, keep_checkpoints=where.keep_checkpoints)
    if is_main_process():  # under a launcher, one process reports
        print(f"{summary['train_examples']} training and {summary['held_out_examples']} held-out examples, "
              f"{summary['optimizer_steps']} steps; data: {summary['data']}")
        print("held-out loss and top-1 accuracy per head:")
        print(format_head_table(summary["held_out_before"], summary["held_out_after"]))
        print(f"heads written to {where.output}")
    return summary


def finetune_command(settings: FinetuneSettings, where: RunOutput) -> dict:
    """Fine-tune a model on a task with CAFT (paper eq. 4), or the plain next-token baseline (`--mode ntp`).

    The loss is L = CE_1 + beta * gamma(step) * sum_{k=2..n} alpha^(k-1) * CE_k over the assistant tokens, with
    the auxiliary heads of `--heads` (from `caft train-heads`) frozen; `--mode ntp` trains with CE_1 alone and
    everything else identical, for comparison. The run folder gets checkpoints, `final/` (LoRA adapter or full
    weights, without heads), `heads/`, `caft_run.json`, `log_history.json` and `head_losses.png`; turn it into
    a plain transformers model with `caft export`.
    """
    from ..core.distributed import is_main_process
    from .finetuning import finetune

    summary = finetune(where.output, settings, resume=where.resume)
    if is_main_process():  # under a launcher, one process reports
        print(f"{summary['train_examples']} training and {summary['held_out_examples']} held-out examples, "
              f"{summary['optimizer_steps']} steps; data: {summary['data']}")
        for name, metrics in summary["held_out_per_head"].items():
            print(f"held-out {name}: loss {metrics['loss']:.4f}, top-1 accuracy {metrics['accuracy']:.4f}")
        print(f"run written to {where.output}; next: caft export {where.output} --output model")
    return summary


def export_heads_command(settings: ExportHeadsSettings) -> dict:
    """Write the heads in a format a serving engine loads beside the model.

    --format eagle3: head 2 (the first auxiliary head, which predicts token t+2) as an EAGLE-3 draft, config.json and
    model.safetensors, exactly: the draft reads the input of the last layer (fc the identity, the embedding half of
    q/k/v zero), the head's input norm is its hidden_norm, the model's final norm and unembedding its norm and
    lm_head. vLLM and SGLang serve it as a speculative draft of one token per step (heads 3..n stay caftkit's own).
    Llama- and Qwen3-family models only; another is refused before anything is written, naming why, and every
    weight written is checked against the layout the engines load.
    """
    from ..files.outputs import output_lock
    from .export_heads import export_heads

    with output_lock(settings.output):
        written = export_heads(settings.model, settings.heads, settings.output, settings.dtype)
    print(f"EAGLE-3 draft of {settings.heads} written to {written['draft']}; serve it with vLLM: vllm serve "
          f"{settings.model} --speculative-config '{{\"method\": \"eagle3\", \"model\": \"{written['draft']}\", "
          f"\"num_speculative_tokens\": 1}}'")
    return written


def export_command(settings: ExportSettings) -> dict:
    """Export a `caft finetune` run as a plain transformers model: LoRA merged, heads stripped.

    The model folder gets the weights, config, tokenizer and a model card (base, data, CAFT settings, final
    held-out metrics), and loads with `AutoModelForCausalLM.from_pretrained` without caftkit. The heads the run
    used are copied beside it, for reuse and for speculative decoding, recorded as heads of the exported model
    (`caft generate --model OUT --heads OUT-heads --speculative` accepts the pair). With --eagle3, head 2 is also
    written as an EAGLE-3 draft of the exported model to OUT-eagle3, for vLLM and SGLang (see `caft export-heads`).

    With --eval, the card also reports task evaluations: `caft eval --model OUT --task ... --output EVAL` on an
    export, then the export again with `--eval EVAL` (an earlier export is replaced whole; the evaluation folders
    are only read). Each must have scored an export of this run in this dtype, which is checked before anything is
    written; its metrics, with their 95% intervals, go into the card's model-index and an Evaluation table.
    """
    from contextlib import ExitStack

    from ..files.outputs import output_lock
    from .export import export_outputs, export_run

    with ExitStack() as locks:
        for output in export_outputs(settings.output, settings.heads_output, settings.eagle3):
            locks.enter_context(output_lock(output))
        written = export_run(settings.run, settings.output, settings.heads_output, settings.dtype, settings.eagle3,
                             settings.eval)
    print(f"model written to {written['model']}" + (f"; heads to {written['heads']}" if written["heads"] else "")
          + (f"; EAGLE-3 draft to {written['draft']}" if written.get("draft") else "")
          + (f"; its card reports the evaluations in {', '.join(settings.eval)}" if settings.eval else ""))
    return written
