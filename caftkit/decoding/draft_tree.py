"""Draft trees for speculative decoding: which of the heads' candidate tokens to verify, and which of them held.

With `num_aux_heads` heads proposing `candidates` tokens each, a draft is a path (r1, ..., rd): the r1-th candidate of
the first head, then the r2-th of the second, and so on. All such paths form a tree under the root (the
model's own next token). Each pass verifies only the `size` likeliest paths, scored by the sum of the heads'
log-probabilities along the path; a path always scores at least as high as its extensions, so the chosen
nodes include their ancestors and form a tree themselves. With `candidates` 1 the tree is a chain of `num_aux_heads`
drafts.

A verification pass runs the model once over the root and the chosen nodes, each node attending to the
accepted text and to its own ancestors only. A node holds when its token is the model's greedy token after its
parent and its parent holds; at most one node per depth can hold (siblings are different tokens), so the
nodes that hold are one path: the accepted tokens. When the model samples, "its greedy token" is the token it
sampled after the parent: the child equal to it is followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch


@dataclass
class DraftBlock:
    """The nodes verified in one pass, per row: node 0 is the root, the others are chosen draft paths in order of
    depth (parents before children)."""

    tokens: torch.Tensor  # [batch, 1 + size] the token each node proposes (root: the model's next token)
    parent: torch.Tensor  # [batch, 1 + size] index of each node's parent in the block (the root's is 0)
    depth: torch.Tensor  # [batch, 1 + size] 0 for the root, d for the d-th head's candidate
    attends: torch.Tensor  # [batch, 1 + size, 1 + size] node i may see node j (j is i or an ancestor of i)


@dataclass
class AcceptedPath:
    """What one verification pass accepted in each row."""

    length: torch.Tensor  # [batch] accepted tokens (the root and the drafts that held)
    nodes: torch.Tensor  # [batch, max_depth + 1] block index of the accepted node at each depth (0 past the end)
    last: torch.Tensor  # [batch] block index of the deepest accepted node


class DraftTree:
    """All candidate paths of `num_aux_heads` heads with `candidates` tokens each, and the choice of the likeliest."""

    def __init__(self, num_aux_heads: int, candidates: int, device: torch.device | str = "cpu"):
        if num_aux_heads < 1 or candidates < 1:
            raise ValueError(f"a draft tree needs at least one head and one candidate (got {num_aux_heads} heads, "
                             f"{candidates} candidates)")
        paths: list[tuple[int, ...]] = [()]
        for depth in range(1, num_aux_heads + 1):
            paths += list(product(range(candidates), repeat=depth))
        index = {path: i for i, path in enumerate(paths)}
        self.num_aux_heads, self.candidates_per_head = num_aux_heads, candidates
        self.candidates = len(paths) - 1
        self.depth = torch.tensor([len(p) for p in paths], device=device)
        # The head and the rank of a path's last candidate (the root gets head 0, rank 0: never read).
        self.head = (self.depth - 1).clamp(min=0)
        self.rank = torch.tensor([p[-1] if p else 0 for p in paths], device=device)
        self.parent = torch.tensor([index[p[:-1]] if p else 0 for p in paths], device=device)
        self.ancestors = torch.tensor([[float(len(q) <= len(p) and p[: len(q)] == q) for q in paths] for p in paths],
                                      device=device)

    @property
    def is_chain(self) -> bool:
        return self.candidates_per_head == 1

    def block_width(self, size: int, max_depth: int) -> int:
        """Nodes in a block of the `size` likeliest paths through the first `max_depth` heads, the root included."""
        return 1 + min(size, int((self.depth <= max_depth).sum()) - 1)

    def choose(self, root: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor, size: int,
               max_depth: int | None = None) -> DraftBlock:
        """The `size` likeliest paths for each row, given the root tokens `[batch]` and the heads' candidates and
        their log-probabilities, `[batch, num_aux_heads, candidates]` each (candidates in decreasing order); only
        paths through the first `max_depth` heads when given (0: the root alone)."""
        batch = root.shape[0]
        max_depth = self.num_aux_heads if max_depth is None else max_depth
        allowed = self.depth <= max_depth
        size = self.block_width(size, max_depth) - 1
        if size == 0:
            return DraftBlock(tokens=root[:, None], parent=root.new_zeros(batch, 1), depth=root.new_zeros(batch, 1),
                              attends=torch.ones(batch, 1, 1, dtype=torch.bool, device=root.device))
        step = logprobs[:, self.head, self.rank].float()  # [batch, paths]: log-prob of each path's last step
        step[:, 0] = 0.0
        score = step @ self.ancestors.T  # a path's score: the sum over its nodes
        # Strictly below the parent even when a step has log-prob 0, so that ties never pick a child first.
        score = (score - 1e-4 * self.depth).masked_fill(~allowed, float("-inf"))
        chosen = score[:, 1:].topk(size, dim=-1).indices + 1
        nodes = torch.cat([chosen.new_zeros(batch, 1), chosen.sort(dim=-1).values], dim=-1)  # paths in BFS order
        node_tokens = tokens[:, self.head, self.rank].gather(1, nodes)
        node_tokens[:, 0] = root
        place = torch.zeros(batch, len(self.depth), dtype=torch.long, device=root.device)
        place.scatter_(1, nodes, torch.arange(nodes.shape[1], device=root.device).expand(batch, -1))
        attends = self.ancestors[nodes[:, :, None], nodes[:, None, :]].bool()
        return DraftBlock(tokens=node_tokens, parent=place.gather(1, self.parent[nodes]), depth=self.depth[nodes],
                          attends=attends)


def accept(block: DraftBlock, chosen: torch.Tensor) -> AcceptedPath:
    """The path of `block` that the model's own tokens confirm; `chosen[:, i]` is the token the model chose after
    node i (its greedy token, or its sample)."""
    holds = block.tokens == chosen.gather(1, block.parent)
    holds[:, 0] = True
    max_depth = int(block.depth.max())
    for _ in range(max_depth):  # a node holds only if all its ancestors hold
        holds &= holds.gather(1, block.parent)
    last = torch.where(holds, block.depth, -1).argmax(-1)
    length = block.depth.gather(1, last[:, None]).squeeze(1) + 1
    nodes = torch.zeros(block.tokens.shape[0], max_depth + 1, dtype=torch.long, device=chosen.device)
    node = last
    for _ in range(max_depth + 1):  # walk up from the deepest accepted node, writing each at its depth
        nodes.scatter_(1, block.depth.gather(1, node[:, None]), node[:, None])
        node = block.parent.gather(1, node[:, None]).squeeze(1)
    return AcceptedPath(length=length, nodes=nodes, last=last)
