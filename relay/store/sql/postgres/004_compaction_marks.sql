-- Streams are marked for compaction when they are written, so a compaction pass reads the
-- marked streams only: an idle relay reads nothing, however much closed data is stored.
-- Existing streams start marked, so the first pass after the upgrade looks at each once.
ALTER TABLE relay_streams ADD COLUMN compact_pending BOOLEAN NOT NULL DEFAULT false;
UPDATE relay_streams SET compact_pending = true;
CREATE INDEX relay_streams_compact ON relay_streams (last_append, id) WHERE compact_pending;
