"""Storage backends behind one interface (see :mod:`relay.store.base`)."""
