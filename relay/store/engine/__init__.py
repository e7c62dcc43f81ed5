"""The storage engine both backends share: ``plan`` (how a batch is planned: every write
operation once, over typed ``needs``, without I/O) and ``engine`` (the ``Store`` operations
over group commit). A backend answers the needs inside its transaction."""
