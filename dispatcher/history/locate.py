"""Where a page of the seed query lies, from exact counts: the SQL functions of migration 2.

The shipper keeps, in the same transaction as the rows, each (url, event) pair's count per
minute and per hour (`history_counts`). For a window [s, e] the exact total is then

    COUNT of the top partial minute [m1, e]   (the window index)
  + the minute counts of [h1, m1) and of [m0, h0)
  + the hour counts of [h0, h1)
  + COUNT of the bottom partial minute [s, m0)

with m0/m1 the first and last full minute and h0/h1 the first and last full hour: at most
~2 x 59 minute rows, 24 hour rows a day and two partial minutes, whatever the number of
records. The same buckets, summed newest first, tell in which minute the page's first and
last rows fall, so a deep page reads a range of at most ~2 minutes of that pair's rows with
a small OFFSET, never a walk over `offset` rows.

`history_locate` is STABLE: its statements see the caller's snapshot, so the count and the
page read in the same statement agree.
"""

from __future__ import annotations

__all__ = ["LOCATE_FUNCTIONS"]

LOCATE_FUNCTIONS = r"""
-- The minute of hour [p_hour, p_hour + 1 h) holding the p_want-th row (0-based, newest
-- first) of that hour, and how many rows of the hour are newer than that minute.
CREATE FUNCTION history_minute_of(p_pair int, p_hour bigint, p_want bigint,
                                  OUT bucket bigint, OUT before bigint)
LANGUAGE sql STABLE AS $fn$
  SELECT x.bucket_ms, x.before FROM (
    SELECT c.bucket_ms, sum(c.n) OVER w - c.n AS before, sum(c.n) OVER w AS upto
      FROM history_counts c
     WHERE c.pair_id = p_pair AND c.span = 60000
       AND c.bucket_ms >= p_hour AND c.bucket_ms < p_hour + 3600000
    WINDOW w AS (ORDER BY c.bucket_ms DESC ROWS UNBOUNDED PRECEDING)) x
  WHERE x.upto > p_want ORDER BY x.bucket_ms DESC LIMIT 1
$fn$;

-- The exact total of a window, and the page [p_offset, p_offset + p_limit) as a time
-- range [lo, hi] to read with OFFSET skip: full minutes and hours come from
-- history_counts, the two partial minutes at the edges are counted on the index. The
-- range holds at most ~2 minutes of the pair's rows beyond the page, whatever the depth.
CREATE FUNCTION history_locate(p_pair int, p_start bigint, p_end bigint, p_offset bigint,
                               p_limit bigint,
                               OUT total bigint, OUT lo bigint, OUT hi bigint, OUT skip bigint)
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  m0 bigint := (p_start + 59999) / 60000 * 60000;  -- first full minute (times are >= 0)
  m1 bigint := (p_end + 1) / 60000 * 60000;        -- end (exclusive) of the last full one
  h0 bigint := (m0 + 3599999) / 3600000 * 3600000;
  h1 bigint := m1 / 3600000 * 3600000;
  k_last bigint := p_offset + p_limit - 1;          -- last row of the page
  top_n bigint;
  mid_n bigint;
  bot_n bigint;
  s1_lo bigint; s1_span int; s1_before bigint;  -- bucket of the page's first row
  s2_lo bigint; s2_span int; s2_before bigint;  -- bucket of its last row
  m record;
BEGIN
  lo := p_start; hi := p_end; skip := p_offset;
  IF m0 >= m1 THEN  -- no full minute: at most two partial minutes, counted exactly
    SELECT count(*) INTO total FROM history_attempts
     WHERE pair_id = p_pair AND created_ms BETWEEN p_start AND p_end;
    RETURN;
  END IF;
  IF h0 >= h1 THEN h0 := m1; h1 := m1; END IF;     -- no full hour: minutes only
  SELECT count(*) INTO top_n FROM history_attempts
   WHERE pair_id = p_pair AND created_ms BETWEEN m1 AND p_end;
  SELECT count(*) INTO bot_n FROM history_attempts
   WHERE pair_id = p_pair AND created_ms BETWEEN p_start AND m0 - 1;
  -- every counted bucket newest first, with the rows above it; the buckets of the
  -- page's first and last rows
  WITH seg AS MATERIALIZED (
    SELECT c.bucket_ms, c.span, sum(c.n) OVER w - c.n AS before, sum(c.n) OVER w AS upto
      FROM history_counts c
     WHERE c.pair_id = p_pair AND ((c.span = 60000 AND c.bucket_ms >= h1 AND c.bucket_ms < m1)
        OR (c.span = 3600000 AND c.bucket_ms >= h0 AND c.bucket_ms < h1)
        OR (c.span = 60000 AND c.bucket_ms >= m0 AND c.bucket_ms < h0))
    WINDOW w AS (ORDER BY c.bucket_ms DESC ROWS UNBOUNDED PRECEDING))
  SELECT coalesce((SELECT max(upto) FROM seg), 0), a.bucket_ms, a.span, a.before,
         b.bucket_ms, b.span, b.before
    INTO mid_n, s1_lo, s1_span, s1_before, s2_lo, s2_span, s2_before
    FROM (SELECT 1) one
    LEFT JOIN LATERAL (SELECT * FROM seg WHERE upto > p_offset - top_n
                        ORDER BY bucket_ms DESC LIMIT 1) a ON true
    LEFT JOIN LATERAL (SELECT * FROM seg WHERE upto > k_last - top_n
                        ORDER BY bucket_ms DESC LIMIT 1) b ON true;
  total := top_n + mid_n + bot_n;
  -- where the page starts: hi and skip
  IF p_offset >= total THEN
    hi := p_start - 1;  -- past the end: an empty range, not a walk
  ELSIF p_offset >= top_n + mid_n THEN
    hi := m0 - 1; skip := p_offset - top_n - mid_n;
  ELSIF p_offset >= top_n THEN
    skip := p_offset - top_n - s1_before;
    hi := s1_lo + s1_span - 1;
    IF s1_span = 3600000 THEN
      m := history_minute_of(p_pair, s1_lo, skip);
      hi := m.bucket + 59999; skip := skip - m.before;
    END IF;
  END IF;
  -- where it ends: lo
  IF k_last < top_n THEN
    lo := m1;
  ELSIF k_last < top_n + mid_n THEN
    lo := s2_lo;
    IF s2_span = 3600000 THEN
      lo := (history_minute_of(p_pair, s2_lo, k_last - top_n - s2_before)).bucket;
    END IF;
  END IF;
END $fn$;
"""
