"""Runs in `.venv-vllm` (vLLM's own environment, without caftkit): greedy answers of vLLM to prompts given as
token ids, with or without an EAGLE-3 draft, and vLLM's speculative-decoding counters, written as JSON.

    python vllm_generate.py MODEL PROMPTS_JSON MAX_TOKENS DRAFT_OR_DASH OUTPUT_JSON
"""

import json
import os
import sys

# The engine in this process. Otherwise vLLM's CPU build starts an engine-core process and a worker process beside
# it, each importing vLLM again (half a minute per run on a 2-core machine); with multiprocessing off it keeps its
# single-device default, one worker in the same process. The model, the draft and the speculative decoding they run
# are the same code either way.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402


def counters(metrics) -> dict:
    """The speculative-decoding counters of `LLM.get_metrics()` (summed over their labels)."""
    wanted = {"vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
              "vllm:spec_decode_num_accepted_tokens"}
    found = {}
    for metric in metrics:
        if metric.name in wanted and hasattr(metric, "value"):
            found[metric.name] = found.get(metric.name, 0) + metric.value
    return found


def main() -> None:
    model, prompts_path, max_tokens, draft, output = sys.argv[1:6]
    with open(prompts_path) as handle:
        prompts = json.load(handle)
    speculative = ({"method": "eagle3", "model": draft, "num_speculative_tokens": 1} if draft != "-" else None)
    # float32, as caftkit measures; eager: no compilation at start (minutes on a CPU); the counters need the stats
    llm = LLM(model=model, dtype="float32", seed=0, max_model_len=1024, gpu_memory_utilization=0.2,
              enforce_eager=True, disable_log_stats=False, speculative_config=speculative)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True))
    answers = [list(output.outputs[0].token_ids) for output in outputs]
    with open(output, "w") as handle:
        json.dump({"answers": answers, "counters": counters(llm.get_metrics())}, handle)


if __name__ == "__main__":
    main()
