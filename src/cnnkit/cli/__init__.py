"""The `cnnkit` command line: one module per command family."""
