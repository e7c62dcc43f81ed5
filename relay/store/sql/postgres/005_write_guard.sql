-- relay_guard(ok) raises SQLSTATE RL001 unless ok. The one-round-trip write (a relay appending
-- to streams it last wrote itself) checks with it that every stream it writes is still as that
-- relay committed it; the error rolls the whole statement back, and the relay takes the
-- locking path instead.
CREATE OR REPLACE FUNCTION relay_guard(ok boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'relay: a stream changed since this relay last wrote it'
            USING ERRCODE = 'RL001';
    END IF;
    RETURN true;
END
$$;
