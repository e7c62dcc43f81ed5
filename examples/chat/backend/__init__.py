"""The backend of the Relay chat example: chats in a database, replies as Relay streams."""
