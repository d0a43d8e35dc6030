"""The commands (console scripts declared in setup.py): each parses its flags and calls the library."""
