"""The `parrot` command group."""
