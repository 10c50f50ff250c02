"""A run's checkpoints: the one it resumes from, and a rotation that removes only checkpoints the run wrote.

A run resumes from the newest complete `checkpoint-N` folder (`last_checkpoint`), passing over one a killed run was
still writing.

transformers' own rotation (`save_total_limit`) removes the oldest folders of the output whose names start with
`checkpoint-` and contain a number, whoever wrote them: a user's `checkpoint-1-backup/` goes too. caftkit's runs
pass no limit to the Trainer and rotate here instead: each checkpoint is claimed in the output folder's marker
(`outputs.claim`) as it is saved, and only claimed checkpoints are ever removed, the newest and the best kept.
A checkpoint being written when the run was killed is never claimed: it stays, and nothing else is lost.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files.outputs import claim, claimed, remove_claimed

_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
TRAINER_STATE_FILE = "trainer_state.json"


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _is_complete_checkpoint(path: Path) -> bool:
    """Whether `path` holds a whole `trainer_state.json`. The Trainer writes it last and not atomically: a run
    killed while writing it leaves the file empty or cut short, which no longer parses as one JSON object."""
    try:
        return isinstance(json.loads((path / TRAINER_STATE_FILE).read_bytes()), dict)
    except (OSError, ValueError):
        return False


def last_checkpoint(directory: Path) -> str | None:
    """The newest complete `checkpoint-N` folder in `directory`, or None.

    A folder without a whole `trainer_state.json` (written last) is a checkpoint a killed run was still writing,
    and resuming from it would fail, so the one before it is taken."""
    if not Path(directory).is_dir():
        return None
    found = sorted((path for path in Path(directory).iterdir() if _CHECKPOINT_NAME.fullmatch(path.name)),
                   key=_checkpoint_step)
    complete = [path for path in found if _is_complete_checkpoint(path)]
    newest = complete[-1] if complete else None
    skipped = [path.name for path in found if newest is None or _checkpoint_step(path) > _checkpoint_step(newest)]
    if skipped:
        which = "which lacks a whole" if len(skipped) == 1 else "which lack a whole"
        them = "it" if len(skipped) == 1 else "them"
        warnings.warn(f"{directory}: skipping {', '.join(skipped)}, {which} {TRAINER_STATE_FILE} (a run killed "
                      f"while writing {them}); the last complete checkpoint is {newest.name if newest else 'none'}",
                      UserWarning, stacklevel=2)
    return str(newest) if newest else None


class ClaimedCheckpointRotation(TrainerCallback):
    """Claims each checkpoint the Trainer saves into `checkpoints_dir` (inside the output folder `owner`) and keeps
    at most `save_total_limit` claimed ones (all with None), never the newest or the best one."""

    def __init__(self, owner: str | Path, checkpoints_dir: str | Path, save_total_limit: int | None):
        self.owner = Path(owner)
        self.prefix = Path(checkpoints_dir).relative_to(self.owner)
        self.save_total_limit = save_total_limit

    def _name(self, folder: str) -> str:
        return (self.prefix / folder).as_posix()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        newest = self._name(f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        claim(self.owner, newest)
        if self.save_total_limit is None:
            return
        protected = {newest}
        if state.best_model_checkpoint:
            protected.add(self._name(Path(state.best_model_checkpoint).name))
        own = sorted((int(match[1]), name) for name in claimed(self.owner)
                     if Path(name).parent == self.prefix and (match := _CHECKPOINT_NAME.fullmatch(Path(name).name)))
        excess = len(own) - max(self.save_total_limit, len(protected))
        for _, name in own:
            if excess <= 0:
                break
            if name not in protected:
                remove_claimed(self.owner, name)
                excess -= 1
