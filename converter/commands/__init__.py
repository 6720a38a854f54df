"""The edgectl subcommands: argument parsing and glue, no logic of their own."""
