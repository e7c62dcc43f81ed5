"""Subscriptions (PROTOCOL.md sections 6-7): routes, durable state, delivery, signing keys."""
