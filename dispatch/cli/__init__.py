"""`dispatch`: the command line (dispatch.cli.main:app)."""
