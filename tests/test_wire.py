"""The binary message layout: headers round-trip, payloads are views, tags never collide."""
import numpy as np
import pytest

from mpicdc.runtime import wire


def test_header_round_trip_with_payload():
    x = np.arange(2 * 3 * 70000, dtype=np.float32).reshape(2, 3, 70000)
    buf = wire.message(wire.Header(wire.REPLY, 12345678901, 7, 3, x.shape, 0.125), x)
    head = wire.Header.unpack(buf)
    assert (head.kind, head.request, head.layer, head.block, head.shape, head.compute_s) == \
        (wire.REPLY, 12345678901, 7, 3, x.shape, 0.125)
    np.testing.assert_array_equal(wire.payload(buf, head.shape), x)


def test_reply_buffer_starts_as_not_arrived():
    buf = wire.reply_buffer(4, 5)
    assert wire.Header.unpack(buf).kind == 0
    assert buf.nbytes == wire.HEADER_BYTES + 4 * 5 * 4


def test_reply_tags_distinct_over_the_request_window():
    n_layers = 16
    tags = {wire.reply_tag(req, li, n_layers) for req in range(4096) for li in range(n_layers)}
    assert len(tags) == 4096 * n_layers
    assert min(tags) > wire.TAG_CTRL


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="at most 4 dims"):
        wire.message(wire.Header(wire.JOB, shape=(1, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="too short"):
        wire.payload(np.zeros(wire.HEADER_BYTES + 8, np.uint8), (4,), nbytes=wire.HEADER_BYTES + 8)
