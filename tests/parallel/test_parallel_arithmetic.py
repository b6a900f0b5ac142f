"""Communication per token and memory per rank of sharded expert tables: the numbers the choice rests on."""

import math

import pytest

from peerlm.parallel.arithmetic import comm_bytes_per_token, distinct_rows, memory_per_rank

GiB = 2**30


def test_one_rank_sends_nothing():
    for sharding in ("column", "row"):
        assert comm_bytes_per_token(2048, 8, 16, 1, sharding)["total"] == 0


def test_column_volume_by_hand():
    # D 2048, K 128, P 8, bf16 activations, int32 ids, fp32 scores: 4 slice exchanges of 7/8 * 2048 * 2
    # bytes, ids once, four (T, K) score exchanges
    c = comm_bytes_per_token(2048, 8, 16, 8, "column", act_bytes=2, score_bytes=4, index_bytes=4)
    assert c["total"] == 4 * 7 / 8 * 2048 * 2 + 7 * 128 * (4 + 4 * 4) == 32256
    assert c["forward"] + c["backward"] == c["total"]


def test_row_volume_by_hand():
    P, K, D = 64, 128, 2048
    R = (P - 1) * (1 - (1 - 1 / P) ** K)
    assert 54 < R < 55  # most of the other 63 ranks hold one of a token's 128 experts
    r = comm_bytes_per_token(D, 8, 16, P, "row", act_bytes=2, score_bytes=4, index_bytes=4)
    assert r["total"] == pytest.approx(4 * R * D * 2 + K * (P - 1) / P * (2 * 4 + 2 * 4))


@pytest.mark.parametrize("dim", [512, 1024, 2048, 4096])
@pytest.mark.parametrize("ranks", [2, 8, 64])
@pytest.mark.parametrize("act_bytes", [2, 4])
def test_column_moves_less_at_the_shapes_that_matter(dim, ranks, act_bytes):
    col = comm_bytes_per_token(dim, 8, 16, ranks, "column", act_bytes=act_bytes)["total"]
    row = comm_bytes_per_token(dim, 8, 16, ranks, "row", act_bytes=act_bytes)["total"]
    assert col < row


def test_rows_win_only_for_narrow_models_or_very_many_ranks():
    narrow = [comm_bytes_per_token(128, 8, 16, P, s)["total"] for P in (8,) for s in ("column", "row")]
    assert narrow[0] > narrow[1]
    many = [comm_bytes_per_token(2048, 8, 16, 1024, s)["total"] for s in ("column", "row")]
    assert many[0] > many[1]


def test_memory_of_the_paper_layer_matches_the_issue_and_scales_as_one_over_p():
    one = memory_per_rank(1024**2, 2048, 1)
    # 4.3e9 fp32 parameters: 16 GiB each for weights and gradients, 32 GiB of AdamW moments
    assert one["params"] == one["grads"] == 16 * GiB and one["adamw"] == 32 * GiB
    for P in (8, 64):
        m = memory_per_rank(1024**2, 2048, P)
        for part in ("params", "grads", "adamw"):
            assert m[part] * P == one[part]
        # what is kept for backward grows with P at a fixed batch per rank: the group's ids and gates
        assert m["activations"] > one["activations"]


def test_sparse_gradients_hold_the_retrieved_rows():
    few = memory_per_rank(1024**2, 1024, 8, tokens_per_rank=16, sparse_grad=True)
    dense = memory_per_rank(1024**2, 1024, 8, tokens_per_rank=16)
    assert few["grads"] < dense["grads"] / 50  # 16384 rows of 1M
    assert distinct_rows(100, 1) == pytest.approx(1.0)
    assert distinct_rows(1024, 10**6) == pytest.approx(1024)
    assert distinct_rows(1024**2, 1024**2) == pytest.approx(1024**2 * (1 - math.exp(-1)), rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sharding"):
        comm_bytes_per_token(64, 1, 1, 2, "diagonal")
    with pytest.raises(ValueError, match="divisible"):
        memory_per_rank(64, 100, 8)
