"""The terminal face: a Textual chat app on top of assistant.tasks."""
