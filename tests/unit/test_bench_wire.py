"""The bench's on-the-wire latency pairs each write with the watch packet that preceded it."""

from __future__ import annotations

from bench.wire import ACK_WITHIN, PAIR_WITHIN, delivery_offsets, sidecar_delays


def test_each_write_of_the_sidecar_is_paired_with_the_last_watch_packet_before_it() -> None:
    sidecar, other = {40001, 40002}, {50001}
    rows = [
        [10.000, 6443, 40001, "t"],  # a watch event to the sidecar
        [10.0004, 40002, 8181, "w"],  # its write: 0.4 ms
        [10.010, 6443, 50001, "t"],  # a packet to someone else (the updater's answer): not the sidecar's
        [10.011, 6443, 40001, "t"],
        [10.012, 6443, 40001, "t"],  # the later of two packets counts
        [10.0125, 40002, 8181, "w"],
        [10.013, 50001, 8181, "w"],  # another client's write to OPA: not the sidecar's
        [10.100, 40002, 8181, "w"],  # long after the last watch packet: not a change's write
    ]
    delays = sidecar_delays(rows, sidecar)
    assert [round(d * 1e4) for d in delays] == [4, 5]
    assert all(d <= PAIR_WITHIN for d in delays)
    assert [round(d * 1e4) for d in sidecar_delays(rows, other)] == [30]  # 10.013 - 10.010


def test_the_watch_packet_is_placed_against_the_api_servers_answer_to_the_update_nearest_it() -> None:
    sidecar, updater = {40001, 40002}, {50001}
    rows = [
        [10.000, 6443, 40001, "t"],  # the watch event, 0.5 ms before the answer to the update
        [10.0004, 40002, 8181, "w"],
        [10.0005, 6443, 50001, "t"],
        [10.0995, 6443, 50001, "t"],  # the next update's answer, 0.3 ms before its event
        [10.0998, 6443, 40001, "t"],
        [10.1003, 40002, 8181, "w"],
        [10.300, 6443, 40001, "t"],  # an event with no answer near it (another client's change): left out
        [10.3004, 40002, 8181, "w"],
    ]
    offsets = delivery_offsets(rows, sidecar, updater)
    assert [round(o * 1e4) for o in offsets] == [-5, 3]
    assert all(abs(o) <= ACK_WITHIN for o in offsets)
