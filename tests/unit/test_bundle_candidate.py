"""How kopa knows the validation OPA has tried a candidate (app/bundle/candidate.py): OPA's bundle plugin asks
again only after it has activated (or failed to activate) what it downloaded, and names in If-None-Match the
revision it tried or still runs. Driven here as OPA's downloader drives the bundle server."""

from __future__ import annotations

from app.bundle.candidate import Candidates, Offer

EMPTY, FIRST, SECOND = Offer("r0", b""), Offer("r1", b"1"), Offer("r2", b"2")


def test_a_served_candidate_counts_as_tried_at_the_next_request_only() -> None:
    candidates = Candidates(EMPTY)
    candidates.arrived("")  # OPA's first request: it gets r0
    candidates.served("r0")
    candidates.offer(FIRST)
    assert not candidates.tried_now("r1")
    candidates.arrived("r0")  # a long poll, woken by the offer
    candidates.served("r1")
    assert not candidates.tried_now("r1")  # downloaded, not yet activated
    candidates.arrived("")  # OPA asks again: r1's outcome is in its status
    assert candidates.tried_now("r1")


def test_a_request_that_arrived_before_the_serve_does_not_count() -> None:
    """A request OPA already gave up on can still be answered: only a request after the serve counts."""
    candidates = Candidates(EMPTY)
    candidates.offer(FIRST)
    candidates.arrived("r0")  # given up on by OPA, but held by kopa
    candidates.arrived("r0")  # OPA's next request
    candidates.served("r1")  # the first one is answered now
    assert not candidates.tried_now("r1")
    candidates.served("r1")
    candidates.arrived("r1")
    assert candidates.tried_now("r1")


def test_asking_with_the_offered_revision_means_it_was_tried() -> None:
    """After a failed activation OPA asks with the revision it still runs; offered again, that revision's
    outcome is known at once (it is active)."""
    candidates = Candidates(EMPTY)
    candidates.offer(FIRST)
    candidates.arrived("r0")
    candidates.served("r1")
    candidates.offer(SECOND)
    candidates.offer(EMPTY)
    assert not candidates.tried_now("r0")
    candidates.arrived("r0")
    assert candidates.tried_now("r0")
    assert not candidates.tried_now("r1")  # not the offer any more
