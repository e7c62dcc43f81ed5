-- The stream that supersedes a closed one (Stream-Successor on its close): every read of the
-- old stream names it in a Link header (rel="successor-version").
ALTER TABLE streams ADD COLUMN successor TEXT;
