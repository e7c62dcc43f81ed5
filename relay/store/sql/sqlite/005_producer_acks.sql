-- The offset each producer's newest appends were acknowledged with ("seq:offset,..."), so a
-- retry answered as a duplicate gets its own append's Stream-Next-Offset back.
ALTER TABLE producers ADD COLUMN acks TEXT NOT NULL DEFAULT '';
