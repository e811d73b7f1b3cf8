"""benchmarks/paged_timeline.py's reading of a replay with dependent launches: what each
kernel adds to the step is how far its end moves the latest end so far, which adds up to
the span where the kernels' own times (overlapping) do not."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_profile import advances, span_summary  # noqa: E402
from paged_timeline import added_by_name  # noqa: E402

# a GEMV, a kernel launched early that ends 2 us after it, one inside both, then an idle
# gap and one more: (start, end, name) in us
SPANS = [(0.0, 10.0, "gemv"), (2.0, 12.0, "rope"), (3.0, 11.0, "inner"), (14.0, 15.0, "gemv")]


def test_advances_add_up_to_the_span_and_skip_what_ends_under_another():
    adds = advances(SPANS)
    assert adds == [10.0, 2.0, 0.0, 3.0]  # the last one also takes the idle gap
    span, own, over, idle = span_summary(SPANS)
    assert sum(adds) == span == 15.0 and own == 29.0 and idle == 2.0


def test_added_by_name_is_the_median_over_replays_of_each_replays_sum():
    slower = [(0.0, 10.0, "gemv"), (2.0, 16.0, "rope"), (3.0, 11.0, "inner"),
              (16.0, 17.0, "gemv")]
    runs = [SPANS, slower, SPANS]
    got = dict(added_by_name(runs, [advances(r) for r in runs]))
    assert got == {"gemv": 13.0, "rope": 2.0, "inner": 0.0}
