"""Layer selection for build-student (docs/method.md §1): exact lists for every mode, and bad inputs."""

from __future__ import annotations

import pytest

from bltool.errors import UsageError
from bltool.models.layer_selection import MODES, canonical_mode, select_layers


@pytest.mark.parametrize(
    ("n_teacher", "n_student", "mode", "expected"),
    [
        # mixed: round(linspace(0, N-1, n)), numpy rounding (half to even)
        (12, 6, "mixed", [0, 2, 4, 7, 9, 11]),
        (30, 6, "mixed", [0, 6, 12, 17, 23, 29]),
        (12, 2, "mixed", [0, 11]),
        (12, 3, "mixed", [0, 6, 11]),  # 5.5 → 6 (half to even)
        (6, 3, "mixed", [0, 2, 5]),  # 2.5 → 2 (half to even)
        (4, 3, "mixed", [0, 2, 3]),  # 1.5 → 2
        (10, 4, "mixed", [0, 3, 6, 9]),
        (12, 1, "mixed", [0]),
        (12, 12, "mixed", list(range(12))),
        # first: 0..n-1
        (12, 6, "first", [0, 1, 2, 3, 4, 5]),
        (30, 6, "first", [0, 1, 2, 3, 4, 5]),
        (12, 1, "first", [0]),
        (12, 12, "first", list(range(12))),
        # last: N-n..N-1
        (12, 6, "last", [6, 7, 8, 9, 10, 11]),
        (30, 6, "last", [24, 25, 26, 27, 28, 29]),
        (12, 1, "last", [11]),
        (12, 12, "last", list(range(12))),
        # middle: start (N-n)//2
        (12, 6, "middle", [3, 4, 5, 6, 7, 8]),
        (12, 5, "middle", [3, 4, 5, 6, 7]),
        (30, 6, "middle", [12, 13, 14, 15, 16, 17]),
        (12, 1, "middle", [5]),
        (12, 12, "middle", list(range(12))),
        (1, 1, "middle", [0]),
    ],
)
def test_exact_lists(n_teacher, n_student, mode, expected):
    assert select_layers(n_teacher, n_student, mode) == expected


@pytest.mark.parametrize(("n_teacher", "n_student"), [(12, 6), (30, 6), (7, 3), (12, 12), (12, 1)])
def test_truncated_is_first(n_teacher, n_student):
    assert canonical_mode("truncated") == "first"
    assert select_layers(n_teacher, n_student, "truncated") == select_layers(n_teacher, n_student, "first")
    assert select_layers(n_teacher, n_student, "truncated") == list(range(n_student))


def test_canonical_modes():
    assert MODES == ("first", "middle", "last", "mixed")
    for mode in MODES:
        assert canonical_mode(mode) == mode


@pytest.mark.parametrize("mode", ["first", "middle", "last", "mixed"])
def test_every_depth_gives_distinct_ascending_indices(mode):
    for n_teacher in range(1, 41):
        for n_student in range(1, n_teacher + 1):
            indices = select_layers(n_teacher, n_student, mode)
            assert len(indices) == n_student
            assert all(isinstance(i, int) for i in indices)
            assert indices == sorted(set(indices)), (n_teacher, n_student, indices)
            assert 0 <= indices[0] and indices[-1] <= n_teacher - 1
            if mode == "mixed" and n_student >= 2:
                assert indices[0] == 0 and indices[-1] == n_teacher - 1
                step = (n_teacher - 1) / (n_student - 1)
                assert all(abs(i - j * step) <= 0.5 + 1e-9 for j, i in enumerate(indices))
            if mode != "mixed":  # the other modes keep a contiguous block
                assert indices == list(range(indices[0], indices[0] + n_student))


@pytest.mark.parametrize("n_student", [0, -1, 13, 100])
@pytest.mark.parametrize("mode", ["first", "middle", "last", "mixed", "truncated"])
def test_depth_out_of_range(n_student, mode):
    with pytest.raises(UsageError, match="--layers") as info:
        select_layers(12, n_student, mode)
    assert "12" in str(info.value) and str(n_student) in str(info.value)


@pytest.mark.parametrize("mode", ["random", "First", "", "truncate"])
def test_unknown_mode(mode):
    with pytest.raises(UsageError, match="--mode") as info:
        select_layers(12, 6, mode)
    assert repr(mode) in str(info.value)
    with pytest.raises(UsageError, match="--mode"):
        canonical_mode(mode)


def test_usage_errors_exit_2():
    with pytest.raises(UsageError) as info:
        select_layers(12, 0, "mixed")
    assert info.value.exit_code == 2
