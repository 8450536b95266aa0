"""Retrieval metrics against a brute-force reference, and the evaluation-matrix summary."""
import torch

from evaluate import recall_at_k, summarize


def brute_force_recall(queries, gallery, k):
    """Sort the whole gallery for each query, placing the true match AFTER every item tied with it."""
    hits = 0
    for i, q in enumerate(queries):
        scores = (gallery @ q).tolist()
        order = sorted(range(len(gallery)), key=lambda j: (-scores[j], j == i))
        hits += order.index(i) < k
    return hits / len(queries)


def test_recall_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        n, d = 37, 4
        # few distinct integer values make many exact ties in the scores
        queries = torch.randint(-1, 2, (n, d), generator=g).float()
        gallery = torch.randint(-1, 2, (n, d), generator=g).float()
        gallery[::3] = queries[::3]  # some true matches are perfect
        got = recall_at_k(queries, gallery, ks=(1, 5, 10), chunk_queries=7)  # chunks not dividing n
        for k in (1, 5, 10):
            assert abs(got[k] - brute_force_recall(queries, gallery, k)) < 1e-12, (trial, k)


def test_recall_perfect_and_collapsed():
    eye = torch.eye(20)
    assert recall_at_k(eye, eye, ks=(1,))[1] == 1.0
    same = torch.ones(20, 8)  # every score tied: a collapsed model retrieves nothing
    assert recall_at_k(same, same, ks=(1, 5, 10)) == {1: 0.0, 5: 0.0, 10: 0.0}


def test_summary_of_matrix():
    E = [[10.0, 1.0, 2.0],
         [8.0, 12.0, 3.0],
         [6.0, 7.0, 14.0]]
    s = summarize(E)
    assert s["id"] == 12.0
    assert s["backward_transfer"] == (8.0 + 6.0 + 7.0) / 3
    assert s["forward_transfer"] == (1.0 + 2.0 + 3.0) / 3
    assert summarize([[5.0]]) == {"id": 5.0, "backward_transfer": None, "forward_transfer": None}
