"""The session state table: forward only, final states final, requeue the one way back."""

from __future__ import annotations

import pytest

from pvw_hpc.states import FINAL_STATES, SessionState, can_move, is_final

S = SessionState


@pytest.mark.parametrize(("a", "b"), [(S.SUBMITTED, S.QUEUED), (S.QUEUED, S.STARTING), (S.STARTING, S.READY),
                                      (S.READY, S.ENDED), (S.SUBMITTED, S.READY), (S.STARTING, S.FAILED),
                                      (S.READY, S.QUEUED)])
def test_allowed(a: SessionState, b: SessionState) -> None:
    assert can_move(a, b)


@pytest.mark.parametrize(("a", "b"), [(S.READY, S.STARTING), (S.ENDED, S.READY), (S.FAILED, S.ENDED),
                                      (S.ENDED, S.FAILED), (S.STARTING, S.SUBMITTED), (S.READY, S.READY)])
def test_refused(a: SessionState, b: SessionState) -> None:
    assert not can_move(a, b)


def test_final_states() -> None:
    assert FINAL_STATES == {S.ENDED, S.FAILED}
    assert is_final("ended") and not is_final("ready")
