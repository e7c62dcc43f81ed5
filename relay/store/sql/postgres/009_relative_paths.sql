-- Stream keys are names relative to the HTTP prefix: stores, grants and subscriptions use them
-- as they are, and only the HTTP layer knows that streams live under /v1/stream/.
UPDATE relay_streams SET path = substr(path, 12) WHERE substr(path, 1, 11) = '/v1/stream/';
UPDATE relay_streams SET forked_from = substr(forked_from, 12)
WHERE substr(forked_from, 1, 11) = '/v1/stream/';
UPDATE relay_streams SET successor = substr(successor, 12) WHERE substr(successor, 1, 11) = '/v1/stream/';
