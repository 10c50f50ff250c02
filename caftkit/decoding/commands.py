"""The `caft generate` command.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

from .settings import GenerateSettings


def generate_command(settings: GenerateSettings) -> dict:
    """Answer a prompt with greedy decoding through the model's chat template, streaming to the terminal.

    With --speculative the auxiliary heads draft several tokens per forward pass and the model verifies them:
    the text is the same as without, only faster when the heads guess well.
    """
    from .streaming import answer_prompt

    return answer_prompt(settings)
