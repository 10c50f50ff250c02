"""Draft trees: the likeliest paths are chosen as a tree, and verification accepts exactly the confirmed path."""

import torch

from caftkit.decoding.draft_tree import DraftTree, accept

# Two heads with two candidates each: the first head proposes 10 or 11, the second 20 or 21.
TOKENS = torch.tensor([[[10, 11], [20, 21]]])


def test_the_likeliest_paths_are_chosen_in_depth_order():
    logprobs = torch.tensor([[[-0.1, -2.5], [-0.5, -1.0]]])
    # Path scores: (0) -0.1, (1) -2.5, (0,0) -0.6, (0,1) -1.1, (1,0) -3.0, (1,1) -3.5.
    block = DraftTree(2, 2).choose(torch.tensor([5]), TOKENS, logprobs, size=3)
    assert block.tokens.tolist() == [[5, 10, 20, 21]]
    assert block.parent.tolist() == [[0, 0, 1, 1]]
    assert block.depth.tolist() == [[0, 1, 2, 2]]
    assert block.attends.int().tolist() == [[[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]]


def test_ties_never_choose_a_child_without_its_parent():
    block = DraftTree(3, 2).choose(torch.tensor([5, 6]), torch.arange(12).reshape(2, 3, 2),
                                   torch.zeros(2, 3, 2), size=5)
    for row in range(2):
        depth, parent = block.depth[row].tolist(), block.parent[row].tolist()
        assert depth == [0, 1, 1, 2, 2, 2]
        assert all(parent[i] < i and depth[parent[i]] == depth[i] - 1 for i in range(1, 6))


def test_size_is_capped_at_the_number_of_candidate_paths():
    block = DraftTree(2, 2).choose(torch.tensor([5]), TOKENS, torch.zeros(1, 2, 2), size=50)
    assert block.tokens.shape == (1, 7)  # the root and 2 + 4 paths


def test_accept_follows_the_confirmed_branch():
    logprobs = torch.tensor([[[-0.1, -2.5], [-0.5, -1.0]]]).repeat(2, 1, 1)
    block = DraftTree(2, 2).choose(torch.tensor([5, 5]), TOKENS.repeat(2, 1, 1), logprobs, size=3)
    # Row 0: after the root the model wants 10 (node 1), after node 1 it wants 21 (node 3), then anything.
    # Row 1: after the root it wants 11, which was not drafted.
    greedy = torch.tensor([[10, 21, 7, 8], [11, 20, 21, 9]])
    path = accept(block, greedy)
    assert path.length.tolist() == [3, 1]
    assert path.nodes.tolist() == [[0, 1, 3], [0, 0, 0]]
    assert path.last.tolist() == [3, 0]


def test_a_node_whose_parent_fails_does_not_hold():
    block = DraftTree(2, 1).choose(torch.tensor([5]), torch.tensor([[[10], [20]]]), torch.zeros(1, 2, 1), size=2)
    assert block.tokens.tolist() == [[5, 10, 20]]
    # The token after node 1 would match node 2, but node 1 itself is wrong.
    path = accept(block, torch.tensor([[99, 20, 3]]))
    assert path.length.tolist() == [1] and path.last.tolist() == [0]
