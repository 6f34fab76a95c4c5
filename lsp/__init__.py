"""The editor face: a pygls language server on top of assistant.tasks."""
