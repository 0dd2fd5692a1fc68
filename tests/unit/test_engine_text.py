"""Streaming detokenization, stop strings and loop detection (pure Python)."""

from squish.runtime.detokenizer import TextStream, detect_loop


class ByteTokenizer:
    """Token id == one UTF-8 byte: the harshest case for character splitting."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")


def run(text, stop=(), chunk_check=None):
    ts = TextStream(ByteTokenizer(), tuple(stop))
    out = []
    for b in text.encode():
        d = ts.push(b)
        if d:
            out.append(d)
        if ts.stopped:
            break
    tail = ts.finish()
    if tail:
        out.append(tail)
    return out, ts.stopped


def test_multibyte_characters_never_split():
    text = "héllo 😀 wörld — 日本"
    chunks, _ = run(text)
    assert "".join(chunks) == text
    for c in chunks:
        assert "\ufffd" not in c
        c.encode("utf-8")  # every chunk is valid UTF-8 on its own


def test_stop_string_removed_and_never_leaked_across_chunks():
    chunks, stopped = run("Hello END world", stop=["END"])
    assert stopped
    assert "".join(chunks) == "Hello "
    assert all("E" not in c for c in chunks)


def test_partial_stop_prefix_released_when_it_does_not_match():
    chunks, stopped = run("an ENd and EN", stop=["END"])
    assert not stopped
    assert "".join(chunks) == "an ENd and EN"


def test_earliest_of_several_stops_wins():
    chunks, stopped = run("abc STOP xyz HALT", stop=["HALT", "STOP", "x"])
    assert stopped and "".join(chunks) == "abc "


def test_the_stream_says_which_stop_string_hit():
    def hit(text, stop):
        ts = TextStream(ByteTokenizer(), stop)
        for b in text.encode():
            ts.push(b)
        ts.finish()
        return ts.stop_hit

    assert hit("abc STOP xyz HALT", ("HALT", "STOP")) == "STOP"
    assert hit("abc STOP", ("STOP", "ST")) == "ST"  # complete first, so the text is cut there
    assert hit("café☕", ("é☕", "☕")) == "é☕"  # "☕" arrives whole: both match, the earlier start wins
    assert hit("no stop here", ("HALT",)) is None


def test_multibyte_stop_string():
    chunks, stopped = run("café☕ more", stop=["☕"])
    assert stopped and "".join(chunks) == "café"


def test_detect_loop():
    assert detect_loop([7] * 64)
    assert not detect_loop([7] * 63)
    sentence = list(range(100, 116))  # 16-token sentence said 4 times
    assert detect_loop([1, 2, 3] + sentence * 4)
    assert not detect_loop(list(range(500)))
    assert not detect_loop([1, 2, 3, 4] * 10)  # short: below the 64-token span
