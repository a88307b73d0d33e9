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
    tags = wire.ReplyTags(n_layers, (1 << 31) - 1)
    assert tags.window == 4096
    seen = {tags.tag(req, li) for req in range(4096) for li in range(n_layers)}
    assert len(seen) == 4096 * n_layers
    assert min(seen) > max(wire.TAG_JOB, wire.TAG_CTRL, wire.TAG_START)


def test_reply_tags_shrink_the_window_to_the_tag_upper_bound():
    tags = wire.ReplyTags(95, 32767)  # inception_v3's 95 distributed layers, the MPI standard's minimum TAG_UB
    seen = [tags.tag(req, li) for req in range(tags.window) for li in range(95)]
    assert len(set(seen)) == len(seen) and max(seen) <= 32767
    assert tags.window == (32767 - 15) // 95


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="at most 4 dims"):
        wire.message(wire.Header(wire.JOB, shape=(1, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="too short"):
        wire.payload(np.zeros(wire.HEADER_BYTES + 8, np.uint8), (4,), nbytes=wire.HEADER_BYTES + 8)
