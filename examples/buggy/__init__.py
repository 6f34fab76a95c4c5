"""A small example package for `moecoder review`, with a few planted bugs.

The bugs (see README.md in this folder) are kept on purpose: do not fix them.
"""
