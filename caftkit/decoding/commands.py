"""The `caft generate` command.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

from .settings import GenerateSettings, Sampling


def generate_command(settings: GenerateSettings, sampling: Sampling) -> dict:
    """Answer a prompt through the model's chat template, streaming to the terminal: greedily, or sampled with
    --temperature (and --top-p, --top-k, --seed) as transformers' generate() samples.

    With --speculative the auxiliary heads draft several tokens per forward pass and the model verifies them:
    greedy text is the same as without, sampled text has the same distribution (each token is the model's own
    choice; drafts are accepted while they equal it), only faster when the heads guess well.
    """
    from .streaming import answer_prompt

    return answer_prompt(settings, sampling)
