-- The reaper's orphan pass looks only at soft-deleted streams (it read every stream before).
CREATE INDEX relay_streams_soft_deleted ON relay_streams (id) WHERE soft_deleted;
